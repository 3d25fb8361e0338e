"""A booted test guest: the real QEMU runner, a config disk, SSH and HTTP through
port forwards on 127.0.0.1."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from rockpool.config_disk import make_config_disk
from rockpool.store import Version
from rockpool.tools.qemu import QemuVM, VMConfig, free_port
from rockpool.tools.qemu_img import create_overlay

BOOT_DEADLINE = 900.0  # a failure detector: TCG on a slow, loaded 2-core machine


def ssh_argv(key: Path, port: int, user: str, command: str) -> list[str]:
    """A non-interactive SSH command line for a guest behind a 127.0.0.1 port forward."""
    options = [
        "StrictHostKeyChecking=no",
        "UserKnownHostsFile=/dev/null",
        "LogLevel=ERROR",
        "ConnectTimeout=10",
        "BatchMode=yes",
    ]
    return [
        "ssh",
        "-i",
        str(key),
        "-p",
        str(port),
        *(arg for option in options for arg in ("-o", option)),
        f"{user}@127.0.0.1",
        command,
    ]


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """argv as a local user who is no client of any workspace."""
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a readiness check until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)  # poll interval between checks


class Guest:
    def __init__(
        self,
        image: Version,
        run_dir: Path,
        ssh_key: Path,
        disk_size: int | None = None,
        base: tuple[Path, str] | None = None,
        layout: str = "virtio-blk",
    ):
        """base: the disk to boot (path, format); default the image's qcow2. layout: where
        the disks and NIC sit (tools.qemu.LAYOUTS)."""
        self.layout = layout
        self.image = image
        self.run_dir = run_dir
        self.ssh_key = ssh_key
        run_dir.mkdir(parents=True, exist_ok=True)
        self.disk = run_dir / "disk.qcow2"
        base_disk, base_format = base or (image.output_path("qcow2"), "qcow2")
        create_overlay(base_disk, base_format, self.disk, disk_size)
        self.config_disk = run_dir / "config.img"
        self.vm: QemuVM | None = None

    def configure(self, env: dict[str, str], *, validate: bool = True) -> None:
        make_config_disk(
            self.config_disk, env, self.ssh_key.with_suffix(".pub").read_text(), validate=validate
        )

    def start(self) -> None:
        config = VMConfig(
            name=self.run_dir.name,
            arch=self.image.manifest["architecture"],
            disk=self.disk,
            disk_format="qcow2",
            run_dir=self.run_dir,
            config_disk=self.config_disk,
            forwards={8080: free_port(), 22: free_port()},
            layout=self.layout,
        )
        self.vm = QemuVM(config)
        self.vm.start()

    @property
    def running(self) -> QemuVM:
        assert self.vm is not None, "start() the guest first"
        return self.vm

    def wait_healthz(self, deadline: float = BOOT_DEADLINE) -> float:
        return self.running.wait_http(8080, "/healthz", deadline)

    def http_get(self, path: str) -> tuple[int, bytes]:
        return self.running.http_get(8080, path)

    def ssh_argv(self, command: str) -> list[str]:
        port = self.running.config.forwards[22]
        return ssh_argv(self.ssh_key, port, self.image.manifest["user"], command)

    def ssh(
        self, command: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> str:
        result = subprocess.run(
            self.ssh_argv(command), capture_output=True, text=True, timeout=timeout, input=stdin
        )
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {command!r} exited {result.returncode}: {result.stderr}")
        return result.stdout

    def wait_ssh(self) -> None:
        deadline = time.monotonic() + BOOT_DEADLINE
        while time.monotonic() < deadline:
            assert self.running.alive(), f"QEMU died; console: {self.running.console_log}"
            probe = subprocess.run(self.ssh_argv("true"), capture_output=True, timeout=60)
            if probe.returncode == 0:
                return
            time.sleep(1)  # poll interval between readiness probes
        raise AssertionError(f"no SSH within {BOOT_DEADLINE}s; console: {self.running.console_log}")

    def start_guest_app(self, port: int) -> None:
        start_echo_app(self.ssh, port)

    def stop(self) -> bool:
        return self.vm.stop() if self.vm is not None else True

    def kill(self) -> None:
        if self.vm is not None:
            self.vm.kill()


def start_echo_app(
    ssh: Callable[[str], object], port: int, *, bind: str = "127.0.0.1", prefix: str = ""
) -> None:
    """A tiny HTTP app in the guest, on bind:port, that answers with prefix and the path
    it was asked for; returns once it answers."""
    app = (
        "import http.server\n"
        "class Echo(http.server.BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        f"        body = ({prefix!r} + self.path).encode()\n"
        "        self.send_response(200)\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        f"http.server.HTTPServer(({bind!r}, {port}), Echo).serve_forever()\n"
    )
    ssh(
        f"printf %s {shlex.quote(app)} > /tmp/echo-{port}.py && "
        f"(setsid nohup python3 /tmp/echo-{port}.py >/tmp/echo-{port}.log 2>&1 &)"
    )
    ssh(
        f"for i in $(seq 1 100); do curl -fsS -o /dev/null http://127.0.0.1:{port}/ "
        "&& exit 0; sleep 0.2; done; exit 1"
    )
