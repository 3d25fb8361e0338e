"""The guest-agent client against agents on a socket that answer as qemu-ga does, and as
a hostile guest might: late, with junk, with errors, or without end. The real agent in a
resumed guest is tested in tests/e2e/test_suspend.py."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rockpool.tools import guest_agent
from rockpool.tools.guest_agent import AgentUnavailable, set_clock

Agent = Callable[[socket.socket], None]
Serve = Callable[[Agent], Path]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(agent: Agent) -> Path:
        path = tmp_path / f"agent{len(listeners)}.qga"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listeners.append(listener)

        def accept() -> None:
            connection, _ = listener.accept()
            with connection:
                agent(connection)

        def accept_all() -> None:
            with contextlib.suppress(OSError):  # closed at the test's end
                while True:
                    accept()

        thread = threading.Thread(target=accept_all, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for listener in listeners:
        listener.close()


def _requests(connection: socket.socket) -> Iterator[dict[str, Any]]:
    """Each request the client sends, as qemu-ga's parser sees it (0xFF resets it)."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = connection.recv(4096)
            if not chunk:
                return
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield json.loads(line.replace(b"\xff", b""))


def qemu_ga(
    guest_clock_ns: int, junk: bytes = b"", seen: list[dict[str, Any]] | None = None
) -> Agent:
    def agent(connection: socket.socket) -> None:
        connection.sendall(junk)  # what an earlier client left unread
        for request in _requests(connection):
            if seen is not None:
                seen.append(request)
            command = request["execute"]
            if command == "guest-sync-delimited":
                reply: object = request["arguments"]["id"]
                connection.sendall(b"\xff")
            elif command == "guest-get-time":
                reply = guest_clock_ns
            elif command == "guest-set-time":
                reply = {}
            else:
                connection.sendall(b'{"error": {"class": "CommandNotFound", "desc": "no"}}\n')
                continue
            connection.sendall(json.dumps({"return": reply}).encode() + b"\n")

    return agent


def test_the_clock_is_set_to_the_hosts_and_the_offset_reported(serve: Serve) -> None:
    seen: list[dict[str, Any]] = []
    behind = time.time_ns() - 600 * 10**9  # a guest suspended ten minutes ago
    offset = set_clock(
        serve(qemu_ga(behind, junk=b'{"return": 7}\n\xff{"return": 9}\n', seen=seen))
    )
    assert -601 < offset < -599
    commands = [request["execute"] for request in seen]
    sync = "guest-sync-delimited"
    assert commands == [sync, "guest-get-time", sync, "guest-set-time"]
    sent = seen[-1]["arguments"]["time"]
    assert abs(sent - time.time_ns()) < 5 * 10**9


def syncs_then_answers(answer: bytes) -> Agent:
    """An agent that syncs as qemu-ga does, then answers every command with answer."""

    def agent(connection: socket.socket) -> None:
        for request in _requests(connection):
            if request["execute"] == "guest-sync-delimited":
                token = request["arguments"]["id"]
                connection.sendall(b"\xff" + json.dumps({"return": token}).encode() + b"\n")
            else:
                connection.sendall(answer)

    return agent


def test_a_refusal_is_reported_with_the_agents_words(serve: Serve) -> None:
    refusing = syncs_then_answers(b'{"error": {"class": "GenericError", "desc": "disabled"}}\n')
    with pytest.raises(AgentUnavailable, match="refused: disabled"):
        set_clock(serve(refusing))


def test_a_silent_guest_costs_the_deadline_only(serve: Serve) -> None:
    def silent(connection: socket.socket) -> None:
        connection.recv(4096)
        time.sleep(2)  # holds the connection open past the client's deadline

    started = time.monotonic()
    with pytest.raises(AgentUnavailable, match="in time"):
        set_clock(serve(silent), timeout=0.3)
    assert time.monotonic() - started < 1.5


def test_a_flood_is_cut_off(serve: Serve) -> None:
    def flooding(connection: socket.socket) -> None:
        connection.recv(4096)
        try:
            while True:
                connection.sendall(b"x" * 65536)
        except OSError:
            return

    with pytest.raises(AgentUnavailable, match="without a reply"):
        set_clock(serve(flooding))


def test_a_reply_that_is_no_time_is_not_believed(serve: Serve) -> None:
    with pytest.raises(AgentUnavailable, match="guest-get-time returned"):
        set_clock(serve(syncs_then_answers(b'{"return": "noon"}\n')))


def test_no_agent_behind_the_port(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable):
        set_clock(tmp_path / "none.qga")
    assert guest_agent.PORT_NAME == "org.qemu.guest_agent.0"
