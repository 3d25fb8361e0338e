"""QEMU: UEFI firmware with a fresh NVRAM, virtio devices, user-mode networking with
host port forwards bound to 127.0.0.1, and a QMP socket for state and shutdown.

KVM is used only where a guest really runs under it (kvm.py); a KVM guest that fails at
start is restarted under TCG.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import itertools
import logging
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rockpool import tools
from rockpool.arch import ARCHITECTURES
from rockpool.command import background, run
from rockpool.errors import CommandFailed, Conflict, MissingTool, RockpoolError
from rockpool.files import copy_private, open_private, sha256_file
from rockpool.tools import guest_agent, kvm, qmp
from rockpool.tools.kvm import Firmware

log = logging.getLogger("rockpool.qemu")

START_WATCH_SECONDS = 30.0


@functools.cache
def _has_run_with_user(qemu: str) -> bool:
    """QEMU 9.1 and later take -run-with user=; older ones only -runas."""
    text = run([qemu, "-help"], capture=True).stdout
    return "-run-with" in text and "user=" in text.split("-run-with", 1)[1][:400]


def runas_args(qemu: str, user: str) -> list[str]:
    return ["-run-with", f"user={user}"] if _has_run_with_user(qemu) else ["-runas", user]


def find_firmware(arch: str) -> Firmware:
    firmware = kvm.find_firmware(arch)
    if firmware is None:
        raise MissingTool(
            f"no UEFI firmware for {arch} guests is installed",
            hint=f"run: sudo apt-get install {tools.FIRMWARE_PACKAGES[arch]}",
        )
    return firmware


def accelerator_args(arch: str, verdict: kvm.Verdict) -> list[str]:
    if verdict.kvm:
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", ARCHITECTURES[arch].tcg_cpu]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def random_mac() -> str:
    # QEMU's locally administered prefix 52:54:00.
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))


def option_value(text: str | Path) -> str:
    """A value inside a QEMU option list: a comma is doubled, or it would end the value
    and start an option of its own."""
    return str(text).replace(",", ",,")


@dataclass
class VMConfig:
    name: str
    arch: str
    disk: Path
    disk_format: str
    run_dir: Path
    config_disk: Path | None = None
    cpus: int = 2
    memory_mib: int = 2048
    mac: str = field(default_factory=random_mac)
    forwards: dict[int, int] = field(default_factory=dict)  # guest port -> host port
    # The QMP socket: a short path (108 bytes at most); default run_dir/qmp.sock.
    qmp_socket: Path | None = None
    # The user QEMU drops root for once it is set up (network.py), or None to stay.
    run_as: str | None = None
    # Where the disks and the NIC sit: "virtio-blk" (the QEMU runtime's), or "incus", the
    # layout Incus gives a VM on q35 (each device behind its own PCIe root port, the
    # disks on virtio-scsi), to boot an image as Incus would on a host without KVM.
    layout: str = "virtio-blk"


LAYOUTS = ("virtio-blk", "incus")


@dataclass(frozen=True)
class VMState:
    """What QEMU says of one VM: stopped (no QEMU), running, paused or failed."""

    state: str
    pid: int | None = None
    qemu_status: str | None = None
    reason: str | None = None
    panicked: bool = False  # failed because the guest kernel panicked (the console says so)


SOCKET_PATH_LIMIT = 107  # sun_path holds 108 bytes, the last one NUL


class QemuProcess:
    """The daemonized QEMU of one VM directory, found through its pid file and checked
    against /proc and QMP every time: a crashed, killed or hung VM is never reported as
    running."""

    def __init__(self, run_dir: Path, qmp_socket: Path | None = None) -> None:
        self.run_dir = run_dir
        self.qmp_socket = qmp_socket or run_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        """The host end of the guest agent's virtio port, beside the QMP socket."""
        return self.qmp_socket.with_suffix(".qga")

    def remove_sockets(self) -> None:
        self.qmp_socket.unlink(missing_ok=True)
        self.agent_socket.unlink(missing_ok=True)

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def pid(self) -> int | None:
        """The pid of this VM's QEMU, or None: the pid file's pid counts only while /proc
        shows a live qemu-system process started with this very pid file."""
        try:
            pid = int(self.pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        if state in ("Z", "X") or not Path(argv[0].decode(errors="replace")).name.startswith(
            "qemu-system-"
        ):
            return None
        ours = str(self.pidfile).encode()
        if not any(a == b"-pidfile" and b == ours for a, b in itertools.pairwise(argv)):
            return None  # the pid now belongs to another process
        return pid

    def alive(self) -> bool:
        return self.pid is not None

    def state(self) -> VMState:
        pid = self.pid
        if pid is None:
            return VMState("stopped")
        try:
            status = qmp.run_state(self.qmp_socket)
        except qmp.QmpUnavailable as exc:
            if self.pid is None:
                return VMState("stopped")  # it exited while we asked
            return VMState("failed", pid, None, f"QEMU (pid {pid}) does not answer QMP: {exc}")
        if status == "running":
            panic = kernel_panic(self.console_log)
            if panic is not None:
                return VMState("failed", pid, status, f"{PANICKED}: {panic}", panicked=True)
            return VMState("running", pid, status)
        if status in qmp.FAILED_STATES:
            tail = _tail(self.console_log, 3).replace("\n", " | ")
            reason = f"the guest stopped: QEMU run state {status}" + (
                f"; console ends: {tail}" if tail else "; nothing on the console"
            )
            return VMState("failed", pid, status, reason)
        return VMState("paused", pid, status, f"QEMU run state {status}")

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)  # poll interval: the process is not our child
        return True

    def kill(self) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.wait_exit(30)


class QemuVM(QemuProcess):
    """One VM: its configuration, and the QEMU that runs it."""

    def __init__(self, config: VMConfig) -> None:
        super().__init__(config.run_dir, config.qmp_socket)
        self.config = config
        self.started_at = 0.0
        self.accelerator: kvm.Verdict | None = None
        self._attach: contextlib.ExitStack | None = None

    def argv(self, verdict: kvm.Verdict, fdsets: Mapping[Path, int] | None = None) -> list[str]:
        """QEMU's command line. fdsets: files QEMU opens as /dev/fdset/N, N the value,
        from descriptors it was given (_open_fdsets)."""
        c = self.config
        fdsets = fdsets or {}

        def file(path: Path) -> str:
            return f"/dev/fdset/{fdsets[path]}" if path in fdsets else option_value(path)

        if len(str(self.qmp_socket).encode()) > SOCKET_PATH_LIMIT:
            raise Conflict(
                f"the QMP socket path {self.qmp_socket} is longer than a unix socket allows",
                hint="set XDG_RUNTIME_DIR to a short private directory",
            )
        firmware = find_firmware(c.arch)
        nvram = self._nvram(firmware)
        forwards = ",".join(
            f"hostfwd=tcp:127.0.0.1:{hport}-:{gport}" for gport, hport in sorted(c.forwards.items())
        )
        netdev = "user,id=net0" + (f",{forwards}" if forwards else "")
        argv = [
            tools.QEMU_SYSTEM[c.arch],
            "-name",
            f"rockpool-{c.name}",
            "-machine",
            ARCHITECTURES[c.arch].machine_type,
            *accelerator_args(c.arch, verdict),
            "-smp",
            str(c.cpus),
            "-m",
            str(c.memory_mib),
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={option_value(firmware.code)}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={file(nvram)}",
            "-drive",
            f"if=none,id=root,format={c.disk_format},discard=unmap,file={file(c.disk)}",
            "-netdev",
            netdev,
            *self._devices(),
            "-chardev",
            f"file,id=console,path={option_value(self.console_log)}",
            "-serial",
            "chardev:console",
            "-chardev",
            f"socket,id=qmp,path={option_value(self.qmp_socket)},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            f"socket,id=agent,path={option_value(self.agent_socket)},server=on,wait=off",
            "-device",
            f"virtserialport,bus=agent-serial.0,chardev=agent,name={guest_agent.PORT_NAME}",
        ]
        if c.run_as is not None:
            argv += runas_args(tools.QEMU_SYSTEM[c.arch], c.run_as)
        if c.config_disk is not None:
            argv += [
                "-drive",
                f"if=none,id=config,format=raw,readonly=on,file={option_value(c.config_disk)}",
            ]
        return argv

    def _nvram(self, firmware: Firmware) -> Path:
        nvram = self.config.run_dir / "nvram.fd"
        if not nvram.exists():
            copy_private(firmware.vars_template, nvram)  # a fresh NVRAM, as Tart/Incus
        return nvram

    def _devices(self) -> list[str]:
        """The root disk, the NIC, the RNG and the config disk, as the layout places them."""
        c = self.config
        config = c.config_disk is not None
        if c.layout == "virtio-blk":
            devices = [
                "virtio-blk-pci,drive=root,bootindex=0",
                f"virtio-net-pci,netdev=net0,mac={c.mac}",
                "virtio-rng-pci",
                "virtio-serial-pci,id=agent-serial",
            ] + (["virtio-blk-pci,drive=config"] if config else [])
        elif c.layout == "incus":
            ports = [f"pcie-root-port,id=port{n},chassis={n + 1},port={n + 1}" for n in range(4)]
            devices = [
                *ports,
                "virtio-scsi-pci,id=scsi,bus=port0",
                "scsi-hd,drive=root,bus=scsi.0,channel=0,scsi-id=0,lun=1,bootindex=0",
                f"virtio-net-pci,netdev=net0,mac={c.mac},bus=port1",
                "virtio-rng-pci,bus=port2",
                "virtio-serial-pci,id=agent-serial,bus=port3",
            ] + (["scsi-hd,drive=config,bus=scsi.0,channel=0,scsi-id=1,lun=1"] if config else [])
        else:
            raise ValueError(f"no device layout {c.layout!r}: use one of {LAYOUTS}")
        return [arg for device in devices for arg in ("-device", device)]

    def start(self, attach: contextlib.ExitStack | None = None) -> kvm.Verdict:
        """Boot the VM; under KVM, watch its first seconds and restart it under TCG if
        the guest fails there. Returns the accelerator it runs on, and why.

        A workspace's VM is daemonized and outlives rockpool. With attach, QEMU stays
        rockpool's child instead, is stopped when attach closes, and dies with rockpool
        even by kill -9 (a build's verifying boot)."""
        self._attach = attach
        self._prepare()
        verdict = kvm.choose(self.config.arch)
        if verdict.kvm:
            failure = self._launch_kvm(verdict)
            if failure is None:
                self.accelerator = verdict
                return verdict
            verdict = kvm.remember(
                self.config.arch, "tcg", f"a KVM guest failed at start ({failure}); using TCG"
            )
        self._launch(verdict)
        self.accelerator = verdict
        return verdict

    def _prepare(self) -> None:
        tools.require([tools.QEMU_SYSTEM[self.config.arch]], "running a VM")
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket.parent.mkdir(parents=True, exist_ok=True)

    def resume(self, state: Path, verdict: kvm.Verdict, timeout: float) -> None:
        """Start QEMU from a state save_state wrote, with the accelerator it was saved
        under, and return once the guest runs again. CommandFailed if QEMU cannot load
        it; QEMU is gone then."""
        self._prepare()
        self._launch(verdict, incoming=True)
        try:
            with open(state, "rb") as handle:
                self.qmp("migrate-incoming", fd=handle.fileno(), uri=f"fd:{qmp.PASSED_FD}")
                self._wait_migration(timeout, "loading the saved state")
            # The state was saved paused, and the guest stays paused until told to run.
            while (status := qmp.run_state(self.qmp_socket)) == "inmigrate":
                time.sleep(0.05)  # poll interval: QEMU leaves inmigrate a moment later
            if status != "running":
                self.qmp("cont")
            self.accelerator = verdict
        except (CommandFailed, qmp.QmpUnavailable) as exc:
            self.kill()
            reason = exc.stderr_tail if isinstance(exc, CommandFailed) else str(exc)
            raise CommandFailed(["(qemu) migrate-incoming", str(state)], 1, reason) from None

    def save_state(self, target: Path, timeout: float) -> None:
        """Pause the guest and write its RAM and device state to target, a new 0600
        file (it holds the guest's memory). QEMU stays, paused, for the caller to quit;
        CommandFailed if the migration fails, the guest paused still."""
        self.qmp("stop")
        with open_private(target, "wb") as handle:
            self.qmp("migrate", fd=handle.fileno(), uri=f"fd:{qmp.PASSED_FD}")
            self._wait_migration(timeout, "saving the state")
            handle.flush()
            os.fsync(handle.fileno())

    def _wait_migration(self, timeout: float, doing: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise CommandFailed(
                    ["(qemu) migrate"],
                    1,
                    f"QEMU exited while {doing}: " + _tail(self.run_dir / "qemu.log", 5),
                )
            info = qmp.execute(self.qmp_socket, "query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise CommandFailed(
                    ["(qemu) migrate"], 1, f"{doing} {status}: {info.get('error-desc', '')}"
                )
            if time.monotonic() > deadline:
                with contextlib.suppress(qmp.QmpUnavailable):
                    self.qmp("migrate_cancel")
                raise CommandFailed(["(qemu) migrate"], -1, f"{doing} took over {timeout:.0f}s")
            time.sleep(0.1)  # poll interval: QEMU reports progress only when asked

    def fingerprint(self, verdict: kvm.Verdict) -> dict[str, Any]:
        """What a saved state depends on: QEMU's binary and firmware, and the machine its
        command line makes. Host ports, the QMP socket and the user QEMU runs as are left
        out: they are no part of the guest."""
        argv = self.argv(verdict)
        machine: list[str] = []
        pairs = iter(argv[1:])
        for flag in pairs:
            value = next(pairs, "")
            if flag in ("-run-with", "-runas"):
                continue
            if flag == "-netdev":
                value = value.split(",hostfwd=", 1)[0]
            elif flag == "-chardev" and value.startswith(("socket,id=qmp,", "socket,id=agent,")):
                value = value.split(",path=", 1)[0]
            machine += [flag, value]
        binary = shutil.which(argv[0]) or argv[0]
        return {
            "qemu": {"path": binary, "sha256": sha256_file(binary)},
            "firmware_sha256": sha256_file(find_firmware(self.config.arch).code),
            "machine": machine,
        }

    def _open_fdsets(
        self, files: contextlib.ExitStack
    ) -> tuple[dict[Path, int], list[str], list[int]]:
        """The writable disks as descriptor sets, one open for writing and one for
        reading each: a QEMU that dropped root cannot open them again itself, and saving
        a state reopens them read-only (block inactivation)."""
        fdsets: dict[Path, int] = {}
        args: list[str] = []
        fds: list[int] = []
        nvram = self._nvram(find_firmware(self.config.arch))
        for number, path in enumerate((self.config.disk, nvram), 1):
            fdsets[path] = number
            for mode, access in (("rw", os.O_RDWR), ("ro", os.O_RDONLY)):
                fd = os.open(path, access)
                files.callback(os.close, fd)
                fds.append(fd)
                args += ["-add-fd", f"fd={fd},set={number},opaque={mode}"]
        return fdsets, args, fds

    def _launch(self, verdict: kvm.Verdict, *, incoming: bool = False) -> None:
        self.remove_sockets()
        self.pidfile.unlink(missing_ok=True)
        self.console_log.unlink(missing_ok=True)
        self.started_at = time.monotonic()
        with contextlib.ExitStack() as files:
            fdsets: dict[Path, int] = {}
            fd_args: list[str] = []
            passed: list[int] = []
            if self._attach is None and self.config.run_as is not None:
                fdsets, fd_args, passed = self._open_fdsets(files)
            argv = [*self.argv(verdict, fdsets), *fd_args, "-pidfile", str(self.pidfile)]
            if incoming:
                argv += ["-incoming", "defer"]  # the state comes through QMP, as an fd
            if self._attach is None:
                # -daemonize returns once QEMU is set up, with its errors on our stderr.
                run([*argv, "-daemonize"], timeout=120, umask=0o077, pass_fds=passed)
                return
        output = self.run_dir / "qemu.log"
        proc = self._attach.enter_context(background(argv, log_path=output))
        deadline = time.monotonic() + 120
        while not (self.qmp_socket.exists() and self.alive()):  # QEMU is set up
            if proc.poll() is not None:
                raise CommandFailed(argv, proc.returncode, _tail(output))
            if time.monotonic() > deadline:
                raise CommandFailed(argv, -1, "QEMU did not set up within 120s")
            time.sleep(0.05)  # poll interval while QEMU starts

    def _launch_kvm(self, verdict: kvm.Verdict) -> str | None:
        """Start under KVM and watch until the firmware prints; None if it runs, else
        why not (the failed QEMU is gone by then)."""
        try:
            self._launch(verdict)
        except CommandFailed as exc:
            return f"QEMU exited with status {exc.returncode}: {exc.stderr_tail.strip()[-200:]}"
        works, reason = kvm.watch_start(
            lambda: None if self.alive() else -1,
            self.qmp_socket,
            self.console_log,
            START_WATCH_SECONDS,
            lambda: _tail(self.console_log, 5),
        )
        if works:
            return None
        log.info("%s: %s; restarting it under TCG", self.config.name, reason)
        self.kill()
        return reason

    def _check_alive(self) -> None:
        state = self.state()
        if state.state in ("stopped", "failed"):
            tail = _tail(self.console_log)
            raise CommandFailed([tools.QEMU_SYSTEM[self.config.arch]], -1, state.reason or tail)

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

    def qmp(self, command: str, *, fd: int | None = None, **arguments: Any) -> None:
        qmp.execute(self.qmp_socket, command, fd=fd, **arguments)

    def monitor(self, command_line: str) -> str:
        """A human-monitor command (hostfwd_add has no QMP form); returns its output."""
        arguments: dict[str, Any] = {"command-line": command_line}
        try:
            return str(qmp.execute(self.qmp_socket, "human-monitor-command", **arguments) or "")
        except qmp.QmpUnavailable as exc:
            raise Conflict(
                f"{self.config.name}'s QEMU does not answer: {exc}",
                hint=f"see its state: rockpool workspace status {self.config.name}",
            ) from None

    def add_forward(self, host_port: int, guest_port: int) -> None:
        rule = f"tcp:127.0.0.1:{host_port}-:{guest_port}"
        output = self.monitor(f"hostfwd_add net0 {rule}")
        if output.strip():  # silent when it worked
            raise CommandFailed(["(qemu monitor)", "hostfwd_add", rule], 1, output)

    def remove_forward(self, host_port: int) -> None:
        rule = f"tcp:127.0.0.1:{host_port}"
        output = self.monitor(f"hostfwd_remove net0 {rule}")
        if "removed" not in output and "not found" not in output:  # not found: gone already
            raise CommandFailed(["(qemu monitor)", "hostfwd_remove", rule], 1, output)

    def stop(self, timeout: float = 90.0) -> bool:
        """ACPI power-down, then a hard stop after timeout. True if the guest shut down.

        A guest that does not run (failed, paused) cannot power itself off: it is
        stopped at once."""
        state = self.state()
        if state.state == "stopped":
            return True
        if state.state != "running":
            log.info(
                "%s is %s (%s); stopping it at once", self.config.name, state.state, state.reason
            )
            self.kill()
            return False
        try:
            self.qmp("system_powerdown")
        except qmp.QmpUnavailable as exc:
            log.info("graceful stop of %s failed (%s); killing it", self.config.name, exc)
            self.kill()
            return False
        if self.wait_exit(timeout):
            return True
        log.info("%s did not power off within %.0fs; killing it", self.config.name, timeout)
        self.kill()
        return False


PANICKED = "the guest kernel panicked"
_PANIC = "Kernel panic - not syncing"
PANIC_WINDOW = 16 << 10  # the console's last bytes: a panic is the last thing it prints


def kernel_panic(console_log: Path) -> str | None:
    """The guest kernel's panic line if the console ends in one: QEMU still says
    "running" then (no pvpanic this early in a boot), but the guest never comes back."""
    try:
        with open(console_log, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - PANIC_WINDOW))
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    found = [line.strip() for line in text.splitlines() if _PANIC in line]
    return found[0][:300] if found else None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
