"""QEMU: UEFI firmware with a fresh NVRAM, virtio devices, user-mode networking with
host port forwards bound to 127.0.0.1, and a QMP socket for graceful shutdown.

KVM is used only when a real probe guest runs under it; otherwise TCG.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rockpool import host
from rockpool.command import run
from rockpool.errors import CommandFailed, MissingTool, RockpoolError

log = logging.getLogger("rockpool.qemu")

QEMU_BINARY = {"amd64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
MACHINE = {"amd64": ["-machine", "q35"], "arm64": ["-machine", "virt"]}
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
# (code, vars template) in the order they are tried.
FIRMWARE = {
    "amd64": [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
        ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ],
    "arm64": [("/usr/share/AAVMF/AAVMF_CODE.fd", "/usr/share/AAVMF/AAVMF_VARS.fd")],
}
PROBE_TIMEOUT = 20.0
# amd64 reset vector: mov al,0x2a; out 0xf4,al (isa-debug-exit); hlt.
_X86_PROBE = bytes.fromhex("b02ae6f4f4ebfd")
_X86_PROBE_EXIT = (0x2A << 1) | 1
# arm64 at address 0: PSCI SYSTEM_OFF through hvc, which makes QEMU exit with 0.
_ARM_PROBE = bytes.fromhex("000180520080b072020000d4")


@dataclass(frozen=True)
class Firmware:
    code: Path
    vars_template: Path


def find_firmware(arch: str) -> Firmware:
    for code, variables in FIRMWARE[arch]:
        if Path(code).is_file() and Path(variables).is_file():
            return Firmware(Path(code), Path(variables))
    package = host.FIRMWARE_PACKAGES[arch]
    raise MissingTool(
        f"no UEFI firmware for {arch} guests is installed",
        hint=f"run: sudo apt-get install {package}",
    )


def host_arch() -> str:
    return HOST_ARCH.get(os.uname().machine, os.uname().machine)


@functools.cache
def kvm_usable(arch: str) -> bool:
    """Run a tiny guest under KVM; trust KVM only if it really ran to its exit."""
    forced = os.environ.get("ROCKPOOL_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced == "kvm"
    if arch != host_arch() or not os.path.exists("/dev/kvm"):
        return False
    binary = shutil.which(QEMU_BINARY[arch])
    if binary is None:
        return False
    with tempfile.TemporaryDirectory() as scratch:
        bios = Path(scratch) / "probe.bin"
        if arch == "amd64":
            image = bytearray(64 * 1024)
            image[0xFFF0 : 0xFFF0 + len(_X86_PROBE)] = _X86_PROBE
            bios.write_bytes(bytes(image))
            # The same machine and CPU model as real VMs: a plain probe can pass where
            # `-cpu host` then fails (seen: MSR 0x10a assertion on first instruction).
            argv = [
                binary,
                *MACHINE[arch],
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-display",
                "none",
                "-nodefaults",
                "-no-reboot",
                "-bios",
                str(bios),
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x01",
            ]
            expected = _X86_PROBE_EXIT
        else:
            bios.write_bytes(_ARM_PROBE.ljust(64 * 1024, b"\0"))
            argv = [
                binary,
                *MACHINE[arch],
                "-cpu",
                "host",
                "-accel",
                "kvm",
                "-display",
                "none",
                "-nodefaults",
                "-bios",
                str(bios),
            ]
            expected = 0
        try:
            result = run(argv, check=False, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.info("KVM probe hung; using TCG")
            return False
        usable = result.returncode == expected
        log.info("KVM probe exit status %s: %s", result.returncode, "KVM" if usable else "TCG")
        return usable


def accelerator_args(arch: str) -> list[str]:
    if kvm_usable(arch):
        return ["-accel", "kvm", "-cpu", "host"]
    # Under TCG, arm64's architected pointer authentication costs a lot of emulation;
    # the implementation-defined algorithm is much cheaper and guests cannot tell.
    tcg_cpu = {"amd64": "max", "arm64": "max,pauth-impdef=on"}[arch]
    return ["-accel", "tcg,thread=multi", "-cpu", tcg_cpu]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def random_mac() -> str:
    # QEMU's locally administered prefix 52:54:00.
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


@dataclass
class VMConfig:
    name: str
    arch: str
    disk: Path
    disk_format: str
    run_dir: Path
    carrier: Path | None = None
    cpus: int = 2
    memory_mib: int = 2048
    mac: str = field(default_factory=random_mac)
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port


class QemuVM:
    """One daemonized QEMU process for one disk, found again through its pid file.

    Nothing about it is cached: whether it runs is read from /proc each time, so a
    crashed or killed VM is never reported as running.
    """

    def __init__(self, config: VMConfig) -> None:
        self.config = config
        self.started_at = 0.0

    @property
    def pidfile(self) -> Path:
        return self.config.run_dir / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.config.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.config.run_dir / "console.log"

    def argv(self) -> list[str]:
        c = self.config
        firmware = find_firmware(c.arch)
        nvram = c.run_dir / "nvram.fd"
        if not nvram.exists():
            shutil.copyfile(firmware.vars_template, nvram)  # a fresh NVRAM, as Tart/Incus
        forwards = ",".join(
            f"hostfwd=tcp:127.0.0.1:{hport}-:{gport}" for gport, hport in sorted(c.forwards.items())
        )
        netdev = "user,id=net0" + (f",{forwards}" if forwards else "")
        argv = [
            QEMU_BINARY[c.arch],
            "-name",
            f"rockpool-{c.name}",
            *MACHINE[c.arch],
            *accelerator_args(c.arch),
            "-smp",
            str(c.cpus),
            "-m",
            str(c.memory_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={nvram}",
            "-drive",
            f"if=none,id=root,format={c.disk_format},discard=unmap,file={c.disk}",
            "-device",
            "virtio-blk-pci,drive=root,bootindex=0",
            "-netdev",
            netdev,
            "-device",
            f"virtio-net-pci,netdev=net0,mac={c.mac}",
            "-device",
            "virtio-rng-pci",
            "-serial",
            f"file:{self.console_log}",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
        ]
        if c.carrier is not None:
            argv += [
                "-drive",
                f"if=none,id=config,format=raw,readonly=on,file={c.carrier}",
                "-device",
                "virtio-blk-pci,drive=config",
            ]
        return argv

    def start(self) -> None:
        binary = QEMU_BINARY[self.config.arch]
        host.require({binary: {**host.RUN_TOOLS, **host.RUN_TOOLS_ARM64}[binary]}, "running a VM")
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        self.console_log.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        # -daemonize returns once QEMU is set up, with its errors on our stderr.
        run([*self.argv(), "-daemonize", "-pidfile", str(self.pidfile)], timeout=120)

    @property
    def pid(self) -> int | None:
        """The running QEMU of this VM, checked against /proc; None if there is none."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        if state in ("Z", "X") or str(self.pidfile).encode() not in cmdline:
            return None  # exited, or the pid now belongs to another process
        return pid

    def alive(self) -> bool:
        return self.pid is not None

    def _check_alive(self) -> None:
        if not self.alive():
            tail = _tail(self.console_log)
            raise CommandFailed([QEMU_BINARY[self.config.arch]], -1, tail)

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)  # poll interval: the process is not our child
        return True

    def http_get(self, guest_port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.config.forwards[guest_port], timeout=timeout
        )
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def wait_http(self, guest_port: int, path: str, deadline_seconds: float) -> float:
        """Poll until the guest answers 200 on path; returns seconds since start()."""
        deadline = time.monotonic() + deadline_seconds
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                status, _ = self.http_get(guest_port, path, timeout=5)
                if status == 200:
                    return time.monotonic() - self.started_at
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.5)  # poll interval between readiness checks, not a wait for readiness
        raise RockpoolError(
            f"VM {self.config.name} did not answer {path} on port {guest_port} within "
            f"{deadline_seconds:.0f}s",
            hint=f"see the guest console: {self.console_log}",
        )

    def qmp(self, command: str) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        monitor = QEMUMonitorProtocol(str(self.qmp_socket))
        monitor.connect()
        try:
            monitor.cmd(command)
        finally:
            monitor.close()

    def stop(self, timeout: float = 90.0) -> bool:
        """ACPI power-down, then a hard stop after timeout. True if the guest shut down."""
        if not self.alive():
            return True
        try:
            self.qmp("system_powerdown")
            if self.wait_exit(timeout):
                return True
            log.info("%s did not power off within %.0fs; killing it", self.config.name, timeout)
        except Exception as exc:  # QMP errors of any kind: the hard stop below is always safe
            log.info("graceful stop of %s failed (%s); killing it", self.config.name, exc)
        self.kill()
        return False

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.wait_exit(30)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def create_overlay(base: Path, base_format: str, overlay: Path, size: int | None = None) -> None:
    """A qcow2 overlay whose backing file is base: O(1) whatever base's size."""
    argv: list[str | Path] = [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        base_format,
        "-b",
        base,
        overlay,
    ]
    if size is not None:
        argv.append(str(size))
    run(argv)
