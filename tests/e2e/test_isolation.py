"""Workspaces are isolated tenants (docs/security.md): two run side by side; from inside
one, nothing of the host and nothing of the other answers, while a stand-in for the
internet does; no unprivileged local user reaches either or reads the store; a dynamic
port serves a guest app through a real Caddy, across a restart, until it is removed."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rockpool.runtime.base import State
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store, Version
from rockpool.tools.qemu import free_port
from tests.e2e.conftest import run_rockpool
from tests.e2e.guest import as_nobody, ssh_argv, start_echo_app, wait_until
from tests.e2e.test_workspaces import Session, start

pytestmark = pytest.mark.vm

INTERNET = "198.51.100.2"  # TEST-NET-2: the stand-in internet, in a namespace of ours
INTERNET_HOST_SIDE = "198.51.100.1"
APP_PORT = 9000
CURL_COULD_NOT_CONNECT = 7


class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.answer  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(address: str, port: int, answer: bytes) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer((address, port), Answer)
    server.answer = answer  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def stand_in_internet(work: Path) -> Iterator[str]:
    """An HTTP server at 198.51.100.2 in a network namespace, reached over a veth pair:
    an address that is not this host's, and never anything outside this machine."""
    tag = f"{os.getpid() % 100000}"
    netns, host_end, inner_end = f"rp-inet-{tag}", f"rpv{tag}h", f"rpv{tag}n"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", netns)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", inner_end)
        ip("link", "set", inner_end, "netns", netns)
        ip("addr", "add", f"{INTERNET_HOST_SIDE}/30", "dev", host_end)
        ip("link", "set", host_end, "up")
        ip("-n", netns, "addr", "add", f"{INTERNET}/30", "dev", inner_end)
        ip("-n", netns, "link", "set", inner_end, "up")
        ip("-n", netns, "link", "set", "lo", "up")
        (work / "index.html").write_text("internet-ok\n")
        server = subprocess.Popen(
            [
                *("ip", "netns", "exec", netns),
                *("python3", "-m", "http.server", "80", "--bind", INTERNET),
                *("--directory", str(work)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: _connects(INTERNET, 80), 30, "the stand-in internet's HTTP server")
            yield INTERNET
        finally:
            server.terminate()
            server.wait(timeout=10)
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _filter_state() -> str:
    """What a failure needs to be understood: the filter and who each QEMU runs as."""
    table = subprocess.run(
        ["nft", "list", "table", "inet", "rockpool"], capture_output=True, text=True
    )
    processes = subprocess.run(
        ["ps", "-eo", "uid,user,pid,args", "--sort", "pid"], capture_output=True, text=True
    )
    qemus = [line[:300] for line in processes.stdout.splitlines() if "qemu-system" in line]
    return "\n".join([table.stdout + table.stderr, *qemus])


def _host_address() -> str:
    """This host's first global IPv4 address, where a guest must not reach either."""
    out = subprocess.run(
        ["ip", "-o", "-4", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if address != INTERNET_HOST_SIDE:
            return address
    return INTERNET_HOST_SIDE


@pytest.fixture(scope="module")
def tenants(minimal_image: Version, store_home: Path, ssh_key: Path) -> Iterator[list[Session]]:
    runtime = QemuRuntime(Store(store_home))
    names = ["tenant-a", "tenant-b"]
    for name in names:
        runtime.create(name, minimal_image.ref)
    sessions: dict[str, Session] = {}
    errors: list[BaseException] = []

    def boot(name: str) -> None:
        try:
            sessions[name] = start(runtime, name, ssh_key)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=boot, args=(name,)) for name in names]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        yield [sessions[name] for name in names]
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                runtime.remove(name, force=True)


def guest_curl(session: Session, url: str) -> tuple[int, str]:
    """curl from inside the guest: (its exit status, what it printed)."""
    result = subprocess.run(
        session_ssh_argv(session, f"curl -sS --max-time 20 {url}"),
        capture_output=True,
        text=True,
        timeout=90,
    )
    return result.returncode, result.stdout + result.stderr


def session_ssh_argv(session: Session, command: str) -> list[str]:
    endpoint = session.runtime.endpoint(session.name)
    return ssh_argv(session.key, endpoint.ssh_port or 0, "coder", command)


def test_a_guest_reaches_the_internet_and_nothing_of_the_host(
    tenants: list[Session], tmp_path: Path
) -> None:
    a, b = tenants
    ends_a, ends_b = a.runtime.endpoint(a.name), b.runtime.endpoint(b.name)
    assert ends_a.network == ends_b.network == "isolated"
    host_address = _host_address()
    internet_root = tmp_path / "internet"
    internet_root.mkdir()
    with (
        stand_in_internet(internet_root) as internet,
        serving("0.0.0.0", 0, b"host-service\n") as service,
        serving("127.0.0.1", 0, b'{"admin": "caddy stand-in"}\n') as admin,
    ):
        # The host itself reaches all of them: what the guest does not reach is there.
        for port in (service, admin, ends_b.port, ends_b.ssh_port or 0):
            assert _connects("127.0.0.1", port)
        assert _connects(host_address, service)
        status, out = guest_curl(a, f"http://{internet}/")
        assert status == 0 and "internet-ok" in out, out
        for target, what in [
            (f"10.0.2.2:{ends_b.port}/healthz", "B's code-server forward"),
            (f"10.0.2.2:{ends_b.ssh_port}/", "B's SSH"),
            (f"10.0.2.2:{ends_a.port}/healthz", "its own code-server forward"),
            (f"10.0.2.2:{service}/", "a service on the host's 127.0.0.1"),
            (f"10.0.2.2:{admin}/config/", "Caddy's admin API stand-in"),
            (f"{host_address}:{service}/", "the host's own address"),
            (f"{INTERNET_HOST_SIDE}:{service}/", "the host's address on the veth"),
        ]:
            status, out = guest_curl(a, f"http://{target}")
            assert status == CURL_COULD_NOT_CONNECT, (
                f"{what} answered the guest: {out}\n{_filter_state()}"
            )


def test_no_other_local_user_reaches_a_workspace_or_reads_the_store(
    tenants: list[Session], store_home: Path
) -> None:
    for session in tenants:
        endpoint = session.runtime.endpoint(session.name)
        for port in (endpoint.port, endpoint.ssh_port):
            refused = as_nobody("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{port}/")
            assert refused.returncode == CURL_COULD_NOT_CONNECT, refused.stdout + refused.stderr
        assert _connects("127.0.0.1", endpoint.port)  # root, the worker, does
        directory = store_home / "workspaces" / session.name
        for name in ("workspace.json", "authorized_keys", "config.img", "disk.qcow2"):
            mode = stat.S_IMODE((directory / name).stat().st_mode)
            assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
        read = as_nobody("cat", str(directory / "workspace.json"))
        assert read.returncode != 0 and "Permission denied" in read.stderr
    assert stat.S_IMODE(store_home.stat().st_mode) == 0o700
    listing = as_nobody("ls", str(store_home))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr


def caddy_route(route_id: str, prefix: str, dial: str) -> dict[str, object]:
    """The route docs/init-contract.md gives the worker, for Caddy's admin API."""
    return {
        "@id": route_id,
        "match": [{"path": [f"{prefix}/*"]}],
        "handle": [
            {
                "handler": "subroute",
                "routes": [
                    {
                        "handle": [
                            {"handler": "rewrite", "strip_path_prefix": prefix},
                            {"handler": "reverse_proxy", "upstreams": [{"dial": dial}]},
                        ]
                    }
                ],
            }
        ],
    }


class Caddy:
    """A real Caddy, run as the caddy user as Debian's package runs it, configured
    through its admin API as the worker configures it."""

    def __init__(self, admin: int, port: int) -> None:
        self.admin, self.port = admin, port

    def admin_call(self, method: str, path: str, body: object | None = None) -> None:
        argv = ["curl", "-sS", "-f", "-X", method, f"http://127.0.0.1:{self.admin}{path}"]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{method} {path}: {result.stdout} {result.stderr}"

    def route(self, route_id: str, prefix: str, dial: str) -> None:
        self.admin_call(
            "POST", "/config/apps/http/servers/srv0/routes", caddy_route(route_id, prefix, dial)
        )

    def unroute(self, route_id: str) -> None:
        self.admin_call("DELETE", f"/id/{route_id}")


@contextlib.contextmanager
def caddy_as_its_user() -> Iterator[Caddy]:
    work = Path(tempfile.mkdtemp(prefix="rockpool-caddy-"))
    shutil.chown(work, "caddy", "caddy")
    work.chmod(0o755)
    admin, port = free_port(), free_port()
    config = work / "caddy.json"
    config.write_text(
        json.dumps(
            {
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "apps": {
                    "http": {
                        "servers": {
                            "srv0": {
                                "listen": [f"127.0.0.1:{port}"],
                                "routes": [],
                                "automatic_https": {"disable": True},
                            }
                        }
                    }
                },
            }
        )
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "XDG_DATA_HOME": str(work / "data")}
    with open(work / "caddy.log", "wb") as log:
        caddy = subprocess.Popen(
            [
                *("setpriv", "--reuid=caddy", "--regid=caddy", "--clear-groups"),
                *("caddy", "run", "--config", str(config)),
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(
            lambda: (
                caddy.poll() is None
                and _connects("127.0.0.1", port)
                and _connects("127.0.0.1", admin)
            ),
            30,
            "caddy",
        )
        yield Caddy(admin, port)
    finally:
        caddy.terminate()
        caddy.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


def through_caddy(port: int, path: str) -> tuple[int, str]:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    body, _, code = result.stdout.rpartition("\n")
    return int(code or 0), body


def start_app(session: Session) -> None:
    # On all addresses: QEMU's forwards reach the guest at its own address.
    start_echo_app(session.ssh, APP_PORT, bind="0.0.0.0", prefix="app:")


def port_cli(store_home: Path, *args: str) -> object:
    result = run_rockpool(store_home, "workspace", "port", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_dynamic_port_serves_through_caddy_across_a_restart(
    tenants: list[Session], store_home: Path
) -> None:
    a = tenants[0]
    start_app(a)
    added = port_cli(store_home, "add", a.name, str(APP_PORT))
    assert isinstance(added, dict) and added["guest_port"] == APP_PORT
    host_port = added["host_port"]
    assert isinstance(host_port, int)
    refused = as_nobody("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{host_port}/")
    assert refused.returncode == CURL_COULD_NOT_CONNECT
    prefix = f"/workspace/{a.name}/app"
    with caddy_as_its_user() as caddy:
        caddy.route("app", prefix, f"127.0.0.1:{host_port}")
        assert through_caddy(caddy.port, f"{prefix}/hello") == (200, "app:/hello")

        a.runtime.stop(a.name)
        assert a.runtime.status(a.name).state is State.STOPPED
        listed = port_cli(store_home, "ls", a.name)
        assert listed == [{"guest_port": APP_PORT, "host": None, "host_port": None, "url": None}]
        a.runtime.start(a.name)
        a.wait_ready()
        start_app(a)  # the app itself does not outlive the guest's reboot
        listed = port_cli(store_home, "ls", a.name)
        assert isinstance(listed, list) and len(listed) == 1
        again = listed[0]["host_port"]
        assert a.runtime.endpoint(a.name).ports == {APP_PORT: again}
        caddy.unroute("app")
        caddy.route("app", prefix, f"127.0.0.1:{again}")
        assert through_caddy(caddy.port, f"{prefix}/again") == (200, "app:/again")

        port_cli(store_home, "rm", a.name, str(APP_PORT))
        assert port_cli(store_home, "ls", a.name) == []
        status, _ = through_caddy(caddy.port, f"{prefix}/gone")
        assert status == 502  # Caddy's upstream is gone
    assert not _connects("127.0.0.1", again)


def test_port_verbs_refuse_bad_input(tenants: list[Session], store_home: Path) -> None:
    a = tenants[0]
    for args, code in [
        (("add", a.name, "8080"), 6),  # code-server's, forwarded already
        (("add", a.name, "0"), 2),
        (("rm", a.name, "9999"), 3),
        (("add", "no-such-workspace", "9000"), 3),
    ]:
        result = run_rockpool(store_home, "workspace", "port", *args)
        assert result.returncode == code, result.stderr
        assert "Traceback" not in result.stderr
    assert port_cli(store_home, "ls", a.name) == []
