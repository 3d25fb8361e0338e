"""QMP, QEMU's control socket, through qemu.qmp: each call connects, runs one command
and disconnects, within a deadline, so a hung QEMU cannot hang rockpool."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

log = logging.getLogger("rockpool.qmp")
TIMEOUT = 5.0
# Run states (QMP query-status) in which the guest no longer runs and will not by
# itself: QEMU's process may still be alive.
FAILED_STATES = frozenset(
    {"internal-error", "guest-panicked", "io-error", "shutdown", "watchdog", "colo"}
)


class QmpUnavailable(Exception):
    """The socket does not answer: no QEMU behind it, or one that does not respond."""


async def _execute(
    socket: Path, command: str, arguments: dict[str, Any], timeout: float, fd: int | None
) -> Any:
    client = QMPClient("rockpool")
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        if fd is not None:
            # The monitor keeps a passed descriptor by name for the command that follows.
            client.send_fd_scm(fd)
            await asyncio.wait_for(client.execute("getfd", {"fdname": PASSED_FD}), timeout)
        return await asyncio.wait_for(client.execute(command, arguments or None), timeout)
    finally:
        await client.disconnect()


PASSED_FD = "rockpool-fd"  # the name a passed descriptor has in QEMU: uri "fd:rockpool-fd"


def execute(
    socket: Path, command: str, timeout: float = TIMEOUT, *, fd: int | None = None, **arguments: Any
) -> Any:
    """The return value of one QMP command; QmpUnavailable when QEMU does not answer.

    With fd, the descriptor is passed to QEMU first (SCM_RIGHTS), as PASSED_FD: QEMU may
    run as a user that cannot open the file itself."""
    try:
        return asyncio.run(_execute(socket, command, arguments, timeout, fd))
    except (TimeoutError, OSError, EOFError, ConnectionError) as exc:
        raise QmpUnavailable(f"{socket}: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # qemu.qmp's ConnectError, ExecuteError, StateError...
        if type(exc).__module__.startswith("qemu.qmp"):
            raise QmpUnavailable(f"{socket}: {exc}") from None
        raise


def run_state(socket: Path, timeout: float = TIMEOUT) -> str:
    """QEMU's run state: running, paused, internal-error, shutdown, ..."""
    status = execute(socket, "query-status", timeout)
    return str(status.get("status", "unknown"))
