"""The one wrapper through which every external command runs.

It logs the command line, runs it with a clean environment, copies its output into
the build log, kills it if rockpool itself dies, and turns failure into CommandFailed
carrying the tail of the command's stderr.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

from rockpool import tools
from rockpool.errors import CommandFailed, MissingTool, redact
from rockpool.tools import CLEAN_PATH

log = logging.getLogger("rockpool.command")

STDERR_TAIL_LINES = 25
_PR_SET_PDEATHSIG = 1

# Host variables a build may need to reach package registries. They are passed to
# the build only and never written into an image.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def shown(argv: Sequence[str | Path]) -> str:
    """A command line as logs and errors show it: quoted, with URL credentials masked."""
    return redact(shlex.join(str(a) for a in argv))


def clean_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        "PATH": CLEAN_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
    }
    for name in PROXY_VARIABLES:
        if name in os.environ:
            env[name] = os.environ[name]
    if extra:
        env.update(extra)
    return env


def _child_setup(umask: int) -> Callable[[], None]:
    def setup() -> None:
        os.umask(umask)
        _die_with_parent()

    return setup


def _die_with_parent() -> None:
    # If rockpool is killed (even with SIGKILL) its children go too, so no build
    # process outlives it. prctl is Linux's; on macOS (the Packer path) the process
    # group alone lets run() stop a command and everything it started.
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setpgrp()


def contained(argv: Sequence[str | Path]) -> list[str | Path]:
    """Wrap argv in private mount and PID namespaces.

    Mounts made by the command vanish with its namespace and every process it forks
    dies with it, so an interrupted build leaves nothing behind on the host.
    """
    prefix: list[str | Path] = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ]
    return [*prefix, *argv]


def _pump(stream: IO[bytes], sink: Callable[[str], None]) -> None:
    # Split on \r too: progress meters (qemu-img -p) redraw one line with it.
    pending = b""
    while chunk := os.read(stream.fileno(), 65536):
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for line in lines:
            if line.strip():
                sink(line.decode("utf-8", "replace"))
    if pending.strip():
        sink(pending.decode("utf-8", "replace"))
    stream.close()


def run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input_bytes: bytes | None = None,
    on_line: Callable[[str], None] | None = None,
    capture: bool = False,
    check: bool = True,
    timeout: float | None = None,
    umask: int = 0o022,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion; returns stdout when capture is set. pass_fds stay open
    in the command.

    umask 0o077 makes what the command creates private to the store's owner (config
    disks, overlays); the default leaves image content as packages and setup.sh mean it.
    """
    args = [str(a) for a in argv]
    log.info("$ %s", shown(args))
    stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    stdout_lines: list[str] = []

    def on_stdout(line: str) -> None:
        if capture:
            stdout_lines.append(line)
        else:
            log.debug("%s", redact(line))
        if on_line:
            on_line(line)

    def on_stderr(line: str) -> None:
        stderr_tail.append(line)
        log.debug("%s", redact(line))
        if on_line:
            on_line(line)

    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=dict(env) if env is not None else clean_environment(),
            preexec_fn=_child_setup(umask),
            pass_fds=pass_fds,
        )
    except FileNotFoundError as exc:
        raise _missing(args[0]) from exc
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(proc.stdout, on_stdout), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, on_stderr), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        if input_bytes is not None:
            assert proc.stdin is not None
            proc.stdin.write(input_bytes)
            proc.stdin.close()
        returncode = proc.wait(timeout=timeout)
    except BaseException:
        _terminate(proc)
        raise
    for pump in pumps:
        pump.join()
    stdout = "\n".join(stdout_lines)
    if check and returncode != 0:
        raise CommandFailed(args, returncode, "\n".join(stderr_tail))
    return subprocess.CompletedProcess(args, returncode, stdout, "\n".join(stderr_tail))


def _start_logged(
    argv: Sequence[str | Path],
    log_path: Path,
    env: Mapping[str, str] | None,
    *,
    attached: bool,
) -> subprocess.Popen[bytes]:
    """Start argv with its output appended to log_path: attached, it dies with rockpool;
    detached, it runs in a session of its own and outlives it."""
    args = [str(a) for a in argv]
    log.info("$ %s %s", shown(args), "(while watched)" if attached else "&")
    try:
        with open(log_path, "ab") as output:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else clean_environment(),
                start_new_session=not attached,
                preexec_fn=_child_setup(0o077) if attached else lambda: os.umask(0o077),
            )
    except FileNotFoundError as exc:
        raise _missing(args[0]) from exc


def spawn(
    argv: Sequence[str | Path], *, log_path: Path, env: Mapping[str, str] | None = None
) -> int:
    """Start a long-lived command (a VM) that outlives rockpool; its output goes to log_path.

    It runs in a session of its own, so neither rockpool's exit nor a Ctrl-C in the
    worker's terminal stops it. Returns its pid.
    """
    return _start_logged(argv, log_path, env, attached=False).pid


@contextlib.contextmanager
def background(
    argv: Sequence[str | Path], *, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run argv while the block runs (a probe VM, say), its output to log_path; it is
    stopped, with everything it started, when the block ends, and dies with rockpool."""
    proc = _start_logged(argv, log_path, env, attached=True)
    try:
        yield proc
    finally:
        _terminate(proc)


def _missing(program: str) -> MissingTool:
    package = tools.PACKAGES.get(program)
    return MissingTool(
        f"required tool '{program}' is not installed"
        + (f" (Debian package {package})" if package else ""),
        hint=tools.install_hint([program]),
    )


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Stop a command and everything in its process group."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
