"""A real Caddy in front of a guest's code-server, routed as Rockpool routes it."""

from __future__ import annotations

import http.client
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urljoin, urlsplit

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


def check_behind_caddy(upstream: int, name: str, work: Path) -> None:
    """Route as Rockpool does: Caddy strips /workspace/<name> and proxies to code-server
    at 127.0.0.1:upstream; its pages, assets and proxied ports stay under the prefix."""
    prefix = f"/workspace/{name}/"
    with caddy_in_front(name, upstream, work) as port:
        status, headers, _ = get(port, prefix.rstrip("/"))
        assert status in (301, 302, 307, 308) and headers["Location"].endswith(prefix)
        path = prefix
        for _ in range(5):  # code-server may redirect relatively (e.g. to ./?folder=...)
            status, headers, page = get(port, path)
            if status not in (301, 302, 303, 307, 308):
                break
            path = urljoin(path, headers["Location"])
        assert status == 200, (status, page[:300])
        assert urlsplit(path).path.startswith(prefix), f"redirected out of the prefix: {path}"
        assets = re.findall(rb'(?:src|href)="([^"#:]+\.(?:js|css))"', page)
        assert assets, "the workbench page references no scripts or styles"
        for asset in assets[:5]:
            url = urljoin(path, asset.decode())
            assert url.startswith(prefix), f"{asset!r} escapes the prefix"
            assert get(port, url)[0] == 200, url
        status, _, body = get(port, prefix + "healthz")
        assert status == 200
        status, _, body = get(port, prefix + "absproxy/5173/via/caddy")
        assert status == 200 and body.decode() == f"{prefix}absproxy/5173/via/caddy"
