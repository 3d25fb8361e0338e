"""Whether KVM really runs a guest on this host, found out by trying what a real VM does.

/dev/kvm existing proves little: on some hosts QEMU aborts on the first instruction
under KVM, on others a tiny -bios program runs to its exit yet UEFI firmware from pflash
stops at once with "KVM internal error" and QEMU keeps the guest paused for ever. So the
probe boots the real machine type with the real firmware from pflash and waits for the
firmware's first output, watching QEMU's run state through QMP. The verdict holds until
the host reboots or QEMU changes; a KVM guest that fails at start anyway is restarted
under TCG by the caller, which records it here.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rockpool import tools
from rockpool.arch import ARCHITECTURES, host_architecture
from rockpool.command import background
from rockpool.errors import InvalidInput
from rockpool.rundir import boot_id, run_directory
from rockpool.tools import CLEAN_PATH, qmp

log = logging.getLogger("rockpool.kvm")

PROBE_SECONDS = 20.0
POLL_SECONDS = 0.1  # between looks at the probe's console and run state
ACCEL_VARIABLE = "ROCKPOOL_ACCEL"


@dataclass(frozen=True)
class Firmware:
    code: Path
    vars_template: Path


def find_firmware(arch: str) -> Firmware | None:
    for code, variables in tools.FIRMWARE_FILES[arch]:
        if Path(code).is_file() and Path(variables).is_file():
            return Firmware(Path(code), Path(variables))
    return None


@dataclass(frozen=True)
class Verdict:
    """Which accelerator this host's guests of one architecture get, and why."""

    accelerator: str  # "kvm" or "tcg"
    reason: str
    boot_id: str = ""
    qemu: str = ""  # the QEMU binary it holds for: path, size, mtime
    checked: str = ""

    @property
    def kvm(self) -> bool:
        return self.accelerator == "kvm"


def forced() -> str | None:
    value = os.environ.get(ACCEL_VARIABLE, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in ("kvm", "tcg"):
        raise InvalidInput(
            f"{ACCEL_VARIABLE} must be kvm, tcg or auto, not '{value}'",
            hint=f"unset {ACCEL_VARIABLE} to let rockpool find out what works",
        )
    return value


def _qemu_identity(binary: str) -> str:
    info = Path(binary).stat()
    return f"{binary}:{info.st_size}:{int(info.st_mtime)}"


def _verdict_file(arch: str) -> Path:
    return run_directory() / f"accel-{arch}.json"


def _cached(arch: str, qemu_identity: str) -> Verdict | None:
    try:
        data = json.loads(_verdict_file(arch).read_text())
        verdict = Verdict(**data)
    except (OSError, ValueError, TypeError):
        return None
    if verdict.boot_id != boot_id() or verdict.qemu != qemu_identity:
        return None
    return verdict


def remember(arch: str, accelerator: str, reason: str) -> Verdict:
    """Keep a verdict for this boot of the host (the probe's, or a failed KVM start's)."""
    binary = shutil.which(tools.QEMU_SYSTEM[arch], path=CLEAN_PATH)
    verdict = Verdict(
        accelerator=accelerator,
        reason=reason,
        boot_id=boot_id(),
        qemu=_qemu_identity(binary) if binary else "",
        checked=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    path = _verdict_file(arch)
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps(asdict(verdict), indent=2) + "\n")
    os.replace(scratch, path)
    log.info("accelerator for %s guests: %s (%s)", arch, accelerator, reason)
    return verdict


def choose(arch: str) -> Verdict:
    """The accelerator for a guest of arch: ROCKPOOL_ACCEL if set, else this boot's
    verdict, else a probe's."""
    chosen = forced()
    if chosen is not None:
        return Verdict(chosen, f"{ACCEL_VARIABLE}={chosen}")
    if arch != host_architecture():
        return Verdict("tcg", f"an {arch} guest on an {host_architecture()} host")
    device_problem = kvm_device_problem()
    if device_problem:
        return Verdict("tcg", device_problem)
    binary = shutil.which(tools.QEMU_SYSTEM[arch], path=CLEAN_PATH)
    firmware = find_firmware(arch)
    if binary is None or firmware is None:
        return Verdict("tcg", "QEMU or its firmware is missing; nothing to probe with")
    cached = _cached(arch, _qemu_identity(binary))
    if cached is not None:
        return cached
    works, reason = probe(binary, arch, firmware)
    return remember(arch, "kvm" if works else "tcg", reason)


def kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "this host has no /dev/kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


def probe(binary: str, arch: str, firmware: Firmware) -> tuple[bool, str]:
    """Boot arch's real machine type and firmware under KVM until the firmware prints."""
    with tempfile.TemporaryDirectory(prefix="rockpool-kvm-") as scratch:
        work = Path(scratch)
        nvram = work / "vars.fd"
        shutil.copyfile(firmware.vars_template, nvram)
        console, socket, output = work / "console", work / "qmp.sock", work / "qemu.log"
        argv = [
            binary,
            "-machine",
            ARCHITECTURES[arch].machine_type,
            *("-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256"),
            *("-nodefaults", "-no-user-config", "-display", "none"),
            "-drive",
            f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={nvram}",
            *("-serial", f"file:{console}"),
            *("-qmp", f"unix:{socket},server=on,wait=off"),
        ]
        with background(argv, log_path=output) as proc:
            return watch_start(
                lambda: proc.poll(), socket, console, PROBE_SECONDS, lambda: _tail(output)
            )


def watch_start(
    exit_status: Callable[[], int | None],
    socket: Path,
    console: Path,
    seconds: float,
    qemu_output: Callable[[], str],
) -> tuple[bool, str]:
    """Watch a starting KVM guest until its firmware prints to the console: (True, how)
    when it does, (False, why) when QEMU exits, the guest stops in a failed run state,
    or nothing is printed within seconds."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        status = exit_status()
        if status is not None:
            return False, f"QEMU exited with status {status} under KVM: {qemu_output()}"
        if console.is_file() and console.stat().st_size > 0:
            took = time.monotonic() - started
            return True, f"UEFI firmware printed under KVM after {took:.1f}s"
        if socket.exists():
            try:
                state = qmp.run_state(socket, timeout=2.0)
            except qmp.QmpUnavailable:
                state = None
            if state in qmp.FAILED_STATES:
                return False, f"the guest stopped under KVM in QEMU run state {state}"
        time.sleep(POLL_SECONDS)
    return False, f"UEFI firmware printed nothing under KVM within {seconds:.0f}s"


def _tail(path: Path, chars: int = 300) -> str:
    try:
        return " ".join(path.read_text(errors="replace").split())[-chars:]
    except OSError:
        return ""
