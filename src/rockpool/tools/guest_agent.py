"""qemu-guest-agent, reached through the host end of the guest's virtio port: only what a
resume needs, the guest's clock. The agent runs inside an untrusted guest, so every
reply is bounded in size and time and checked before it is believed."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

PORT_NAME = "org.qemu.guest_agent.0"  # the virtio port Debian's unit starts the agent on
TIMEOUT = 5.0
_REPLY_LIMIT = 64 << 10  # bytes: any reply we ask for is a few dozen
_FLOOD = f"the agent wrote over {_REPLY_LIMIT} bytes without a reply"
_DELIMITER = b"\xff"  # resets the agent's parser; precedes guest-sync-delimited's reply


class AgentUnavailable(Exception):
    """No agent answered, or it answered with something that is not a reply."""


class _Channel:
    """One connection to the agent's socket, with a deadline for all of it."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = b""
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise AgentUnavailable(f"{path}: {exc}") from None

    def close(self) -> None:
        self.sock.close()

    def send(
        self, command: str, arguments: dict[str, Any] | None = None, *, prefix: bytes = b""
    ) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._io(lambda: self.sock.sendall(prefix + json.dumps(message).encode() + b"\n"))

    def skip_to_delimiter(self) -> None:
        """Drop whatever the agent wrote before this exchange, up to its delimiter."""
        dropped = 0
        while _DELIMITER not in self.buffer:
            dropped += len(self.buffer)
            self.buffer = b""
            if dropped > _REPLY_LIMIT:
                raise AgentUnavailable(_FLOOD)
            self._read()
        self.buffer = self.buffer.split(_DELIMITER, 1)[1]

    def reply(self) -> Any:
        while b"\n" not in self.buffer:
            self._read()
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            raise AgentUnavailable(f"the agent wrote no JSON: {line[:80]!r}") from None
        if not isinstance(message, dict):
            raise AgentUnavailable(f"the agent's reply is not an object: {line[:80]!r}")
        if "error" in message:
            error = message["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise AgentUnavailable(f"the agent refused: {str(desc)[:200]}")
        if "return" not in message:
            raise AgentUnavailable(f"the agent's reply has no return: {line[:80]!r}")
        return message["return"]

    def _read(self) -> None:
        if len(self.buffer) > _REPLY_LIMIT:
            raise AgentUnavailable(_FLOOD)
        chunk = self._io(lambda: self.sock.recv(4096))
        if not chunk:
            raise AgentUnavailable("the agent's port closed")
        self.buffer += chunk

    def _io(self, operation: Any) -> Any:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AgentUnavailable("the agent did not answer in time")
        self.sock.settimeout(left)
        try:
            return operation()
        except TimeoutError:
            raise AgentUnavailable("the agent did not answer in time") from None
        except OSError as exc:
            raise AgentUnavailable(f"the agent's port: {exc}") from None


def execute(
    path: Path, command: str, arguments: dict[str, Any] | None = None, timeout: float = TIMEOUT
) -> Any:
    """The return value of one agent command. It follows our own guest-sync-delimited, so
    a reply read after it answers this command, not one an earlier client left unread."""
    channel = _Channel(path, timeout)
    try:
        token = int.from_bytes(os.urandom(4), "big") >> 1
        channel.send("guest-sync-delimited", {"id": token}, prefix=_DELIMITER)
        while True:
            channel.skip_to_delimiter()
            if channel.reply() == token:
                break
        channel.send(command, arguments)
        return channel.reply()
    finally:
        channel.close()


def set_clock(path: Path, timeout: float = TIMEOUT) -> float:
    """Set the guest's clock to the host's now; returns how far the guest's clock was
    from the host's before (seconds, negative when behind). AgentUnavailable if the
    guest has no agent or it does not do what is asked."""
    before = execute(path, "guest-get-time", timeout=timeout)
    if type(before) is not int:
        raise AgentUnavailable(f"guest-get-time returned {str(before)[:80]!r}")
    offset = (before - time.time_ns()) / 1e9
    execute(path, "guest-set-time", {"time": time.time_ns()}, timeout=timeout)
    return offset
