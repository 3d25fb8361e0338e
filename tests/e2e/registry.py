"""A real OCI registry (Debian's docker-registry, the CNCF distribution server) on
127.0.0.1, started for a test and read back over its HTTP API."""

from __future__ import annotations

import http.client
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rockpool.tools.qemu import free_port
from tests.e2e.guest import wait_until

CONFIG = """version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: 127.0.0.1:{port}
"""


def request(port: int, path: str, accept: str = "*/*") -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers={"Accept": accept})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _answers(port: int) -> bool:
    try:
        return request(port, "/v2/")[0] == 200
    except OSError:
        return False


@contextmanager
def local_registry(work: Path) -> Iterator[int]:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yml"
    config.write_text(CONFIG.format(root=work / "data", port=port))
    with open(work / "registry.log", "wb") as log:
        registry = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=log, stderr=log
        )
    try:
        wait_until(
            lambda: registry.poll() is None and _answers(port), 30, "the registry to answer /v2/"
        )
        yield port
    finally:
        registry.terminate()
        registry.wait(timeout=10)


def manifest(port: int, repository: str, tag: str, accept: str) -> tuple[str, dict[str, Any]]:
    """(digest the registry reports, manifest) for repository:tag."""
    status, headers, body = request(port, f"/v2/{repository}/manifests/{tag}", accept)
    assert status == 200, body
    return headers["docker-content-digest"], json.loads(body)


def blob(port: int, repository: str, digest: str) -> bytes:
    status, _, body = request(port, f"/v2/{repository}/blobs/{digest}")
    assert status == 200, f"blob {digest}: HTTP {status}"
    return body
