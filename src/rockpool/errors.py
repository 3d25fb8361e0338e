"""One error type for everything the user can cause or fix, each with its exit code."""

from __future__ import annotations

import re
from enum import IntEnum

# scheme://user:password@host: the userinfo of a proxy or registry URL is a secret.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


# What a user can do when the store's disk fills up during any verb.
FREE_SPACE_HINT = "free space: rockpool image gc; rockpool cache prune --max-size 10G"
_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded")


def redact(text: str) -> str:
    """text with the user:password@ of every URL in it masked, for logs and errors."""
    return _URL_USERINFO.sub(r"\1***@", text)


class ExitCode(IntEnum):
    """Documented process exit codes (see docs/cli.md)."""

    OK = 0
    INTERNAL = 1
    INVALID_INPUT = 2
    NOT_FOUND = 3
    MISSING_TOOL = 4
    COMMAND_FAILED = 5
    CONFLICT = 6
    DAMAGED = 7
    NOT_REPRODUCED = 8  # image verify: the rebuild's bytes differ from the stored version's
    HANGUP = 129
    INTERRUPTED = 130
    BROKEN_PIPE = 141
    TERMINATED = 143


class RockpoolError(Exception):
    """An error with a message for people: what is wrong and how to fix it."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InvalidInput(RockpoolError):
    exit_code = ExitCode.INVALID_INPUT


class SpecError(InvalidInput):
    """A problem in an image spec; always names the file and, where there is one, the key."""

    def __init__(self, path: object, key: str | None, problem: str, *, hint: str | None = None):
        where = f"{path}: {key}" if key else f"{path}"
        super().__init__(f"{where}: {problem}", hint=hint)
        self.path = path
        self.key = key


class NotFound(RockpoolError):
    exit_code = ExitCode.NOT_FOUND


class MissingTool(RockpoolError):
    exit_code = ExitCode.MISSING_TOOL


class Conflict(RockpoolError):
    exit_code = ExitCode.CONFLICT


class CommandFailed(RockpoolError):
    """An external command exited non-zero; carries the tail of its stderr."""

    exit_code = ExitCode.COMMAND_FAILED

    def __init__(self, argv: list[str], returncode: int, stderr_tail: str, log_hint: str = ""):
        shown = redact(" ".join(argv[:6]) + (" ..." if len(argv) > 6 else ""))
        message = f"command failed with exit status {returncode}: {shown}"
        if stderr_tail.strip():
            lines = redact(stderr_tail).rstrip().splitlines()
            indented = "\n".join("    " + line for line in lines)
            message += f"\n  last output:\n{indented}"
        if _DISK_FULL.search(stderr_tail):
            # A full disk shows up as a wall of unrelated-looking failures from the tool.
            message += "\n  the disk is full"
            log_hint = "; ".join(part for part in (FREE_SPACE_HINT, log_hint) if part)
        super().__init__(message, hint=log_hint or None)
        self.argv = argv
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class Damaged(RockpoolError):
    """A record, manifest or cache entry in the store that cannot be read as written."""

    exit_code = ExitCode.DAMAGED


class Interrupted(RockpoolError):
    exit_code = ExitCode.INTERRUPTED


class Terminated(BaseException):
    """SIGTERM, SIGHUP or SIGINT arrived. A BaseException, as KeyboardInterrupt is, so no
    `except Exception` on the way up swallows it: every verb cleans up and exits with
    128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
