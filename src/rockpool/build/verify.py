"""Stage: boot the new image before it lands, so `latest` only ever moves to an image
that proved itself.

The written disk boots headless under QEMU (KVM where a guest really runs under it,
else TCG; an arm64 image on an x86_64 host under qemu-system-aarch64) from a throwaway
overlay, with a config disk as a workspace's start writes one. The image passes once
code-server answers /healthz, or, for an image without code-server, once its SSH server
greets. The VM is stopped and its files deleted whatever happens.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from rockpool.config_disk import make_config_disk
from rockpool.errors import CommandFailed, InvalidInput, RockpoolError
from rockpool.rundir import run_directory
from rockpool.tools.qemu import QemuVM, VMConfig, free_port
from rockpool.tools.qemu_img import create_overlay

if TYPE_CHECKING:
    from rockpool.build.context import BuildContext  # stages are called with one

log = logging.getLogger("rockpool.build.verify")
TIMEOUT_VARIABLE = "ROCKPOOL_VERIFY_TIMEOUT"
# Under TCG the default image answers in 1-2 minutes, the full arm64 one in about 4;
# a contended host takes longer.
DEFAULT_TIMEOUT = 1200.0
POLL_SECONDS = 1.0  # between readiness checks


PANIC_RETRIES = 1  # a guest kernel panic under TCG is booted again once


class GuestPanicked(Exception):
    """The verifying boot's guest kernel panicked (the console says so)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VerificationFailed(RockpoolError):
    """The new image did not come up; it does not land."""

    exit_code = CommandFailed.exit_code


def verify_timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 1e6:
        raise InvalidInput(f"{TIMEOUT_VARIABLE} must be a number of seconds > 0, not '{value}'")
    return seconds


def ssh_greets(port: int) -> bool:
    """An SSH server answers on port with its identification string."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            return connection.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False


def verify_boot(ctx: BuildContext) -> None:
    if not ctx.verify:
        ctx.facts["verification"] = {"verified": False, "skipped": "--no-verify"}
        ctx.reporter.info("verify: skipped (--no-verify)")
        return
    timeout = verify_timeout()
    spec = ctx.spec
    work = ctx.work / "verify"
    work.mkdir()
    overlay = work / "disk.qcow2"
    create_overlay(ctx.disk, "raw", overlay)
    config_disk = make_config_disk(
        work / "config.img",
        {"ROCKPOOL_WORKSPACE_NAME": "verify", "ROCKPOOL_INSTANCE_ID": uuid.uuid4().hex},
    )
    sockets = run_directory() / "verify"
    sockets.mkdir(exist_ok=True)
    vm = QemuVM(
        VMConfig(
            name=f"verify-{spec.name}",
            arch=spec.architecture,
            disk=overlay,
            disk_format="qcow2",
            run_dir=work,
            config_disk=config_disk,
            cpus=min(spec.cpus, os.cpu_count() or 1),
            memory_mib=spec.memory >> 20,
            forwards={8080: free_port(), 22: free_port()},
            qmp_socket=sockets / f"{work.parent.name}.qmp",
        )
    )
    how = "/healthz" if spec.code_server_version else "SSH"
    started = time.monotonic()
    panics: list[str] = []
    try:
        while True:
            try:
                # Attached: QEMU dies with the build, whatever kills it.
                with contextlib.ExitStack() as attached:
                    verdict = vm.start(attach=attached)
                    ctx.reporter.status(f"booting under {verdict.accelerator}; waiting for {how}")
                    _wait(vm, how, started + timeout)
                    seconds = round(time.monotonic() - started, 1)
                break
            except GuestPanicked as exc:
                # Multi-threaded TCG rarely runs stale code across vCPUs while the kernel
                # patches itself (RELIABILITY.md): boot once more, from a fresh overlay.
                panics.append(exc.reason)
                if len(panics) > PANIC_RETRIES:
                    _fail(vm, f"the VM is failed ({exc.reason}), at every boot")
                ctx.reporter.info(f"verify: {exc.reason}; booting once more")
                log.info("the panicked boot's console:\n%s", _console_tail(vm.console_log, 60))
                vm.console_log.unlink(missing_ok=True)
                overlay.unlink()
                create_overlay(ctx.disk, "raw", overlay)
    finally:
        vm.remove_sockets()
        overlay.unlink(missing_ok=True)
    ctx.facts["verification"] = {
        "verified": True,
        "how": f"booted under QEMU ({verdict.accelerator}), {how} answered",
        "accelerator": verdict.accelerator,
        "accelerator_reason": verdict.reason,
        "seconds": seconds,
        "panics": panics,
    }
    ctx.reporter.info(f"verify: {how} answered {seconds:.0f}s after QEMU started")


def _wait(vm: QemuVM, how: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        state = vm.state()
        if state.panicked:
            raise GuestPanicked(state.reason or "the guest kernel panicked")
        if state.state != "running":
            _fail(vm, f"the VM is {state.state}" + (f" ({state.reason})" if state.reason else ""))
        if how == "SSH":
            if ssh_greets(vm.config.forwards[22]):
                return
        else:
            try:
                status, _ = vm.http_get(8080, "/healthz", timeout=5)
                if status == 200:
                    return
            except (OSError, http.client.HTTPException) as exc:
                log.debug("healthz: %s", exc)
        time.sleep(POLL_SECONDS)
    waited = deadline - vm.started_at
    _fail(vm, f"{how} did not answer within {waited:.0f}s (${TIMEOUT_VARIABLE})")


def _fail(vm: QemuVM, problem: str) -> None:
    tail = _console_tail(vm.console_log)
    raise VerificationFailed(
        f"the new image did not come up when booted: {problem}; it was not landed"
        + (f"\n  console ends:\n{tail}" if tail else ""),
        hint="the build log has the whole console; fix the image (setup.sh, packages) and "
        "build again, or build with --no-verify to land it unchecked",
    )


def _console_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    log.debug("verification console:\n%s", text)
    return "\n".join("    " + line.rstrip() for line in text.splitlines()[-lines:])
