"""A real Caddy in front of a guest's code-server, routed as Rockpool routes it."""

from __future__ import annotations

import http.client
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rockpool.tools.qemu import free_port

CADDYFILE = """
{{
    admin off
    auto_https off
}}
http://127.0.0.1:{port} {{
    redir /workspace/{name} /workspace/{name}/
    handle_path /workspace/{name}/* {{
        reverse_proxy 127.0.0.1:{upstream}
    }}
}}
"""


@contextmanager
def caddy_in_front(name: str, upstream: int, work: Path) -> Iterator[int]:
    port = free_port()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "Caddyfile"
    config.write_text(CADDYFILE.format(port=port, name=name, upstream=upstream))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "XDG_DATA_HOME": str(work / "data"),
        "XDG_CONFIG_HOME": str(work / "config"),
    }
    with open(work / "caddy.log", "wb") as log:
        caddy = subprocess.Popen(
            ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert caddy.poll() is None, (work / "caddy.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "caddy did not start listening"
                time.sleep(0.1)  # poll interval for the listening socket
        yield port
    finally:
        caddy.terminate()
        caddy.wait(timeout=10)


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()
