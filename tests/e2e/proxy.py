"""A forward proxy on 127.0.0.1 that demands credentials (Basic), as an operator's
authenticated proxy does: plain HTTP requests in absolute form, and CONNECT for HTTPS.
It counts the requests it let through, so a test knows the build really used it."""

from __future__ import annotations

import base64
import contextlib
import select
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ProxyLog:
    allowed: int = 0
    refused: int = 0
    hosts: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _relay(a: socket.socket, b: socket.socket) -> None:
    sockets = [a, b]
    while True:
        readable, _, _ = select.select(sockets, [], [], 60)
        if not readable:
            return
        for source in readable:
            data = source.recv(65536)
            if not data:
                return
            (b if source is a else a).sendall(data)


def _handler(expected: str, log: ProxyLog) -> type[socketserver.StreamRequestHandler]:
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            request = self.rfile.readline(65536).decode("latin-1")
            headers: list[str] = []
            while (line := self.rfile.readline(65536).decode("latin-1")) not in ("\r\n", "\n", ""):
                headers.append(line)
            method, target, _ = [*request.split(), "", "", ""][:3]
            given = [h.split(":", 1)[1].strip() for h in headers if ":" in h]
            authorized = f"Basic {expected}" in given
            with log.lock:
                if not authorized:
                    log.refused += 1
                else:
                    log.allowed += 1
            if not authorized:
                self.wfile.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                )
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                with log.lock:
                    log.hosts.add(host)
                upstream = socket.create_connection((host, int(port)), timeout=60)
                self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.wfile.flush()
                with upstream:
                    _relay(self.connection, upstream)
                return
            url = urllib.parse.urlsplit(target)
            with log.lock:
                log.hosts.add(url.hostname or "")
            path = url.path + (f"?{url.query}" if url.query else "")
            kept = [
                h
                for h in headers
                if not h.lower().startswith(("proxy-authorization", "proxy-connection"))
            ]
            with socket.create_connection((url.hostname, url.port or 80), timeout=60) as up:
                up.sendall(f"{method} {path or '/'} HTTP/1.1\r\n".encode("latin-1"))
                up.sendall("".join(kept).encode("latin-1") + b"Connection: close\r\n\r\n")
                _relay(self.connection, up)

    return Handler


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextlib.contextmanager
def authenticated_proxy(user: str, password: str) -> Iterator[tuple[int, ProxyLog]]:
    """(port, log) of a proxy on 127.0.0.1 that wants user:password."""
    expected = base64.b64encode(f"{user}:{password}".encode()).decode()
    log = ProxyLog()
    server = _Server(("127.0.0.1", 0), _handler(expected, log))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], log
    finally:
        server.shutdown()
        server.server_close()
