"""The command wrapper: clean environment, logged output, errors with the stderr tail."""

from __future__ import annotations

import logging

import pytest

from rockpool.command import contained, run
from rockpool.errors import CommandFailed, MissingTool


def test_failure_carries_the_stderr_tail() -> None:
    with pytest.raises(CommandFailed) as caught:
        run(["bash", "-c", "for i in $(seq 1 40); do echo line$i >&2; done; exit 3"])
    error = caught.value
    assert error.returncode == 3
    assert "line40" in error.stderr_tail and "line1\n" not in error.stderr_tail
    assert error.exit_code == 5


def test_a_full_disk_is_named_with_how_to_free_space() -> None:
    """A tool that ran out of space is told apart from one that failed for its own reasons,
    and the build log's hint is kept beside the free-space one."""
    full = CommandFailed(
        ["tar", "-x"], 2, "tar: a: Cannot write: No space left on device", "log: L"
    )
    assert "the disk is full" in str(full)
    assert full.hint is not None and "rockpool image gc" in full.hint and "log: L" in full.hint
    other = CommandFailed(["tar", "-x"], 2, "tar: a: Cannot open: Permission denied", "log: L")
    assert "disk is full" not in str(other) and other.hint == "log: L"


def test_environment_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_HOST_SECRET", "s3cret")
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    output = run(["env"], capture=True).stdout
    assert "SOME_HOST_SECRET" not in output
    assert "https_proxy=http://proxy.invalid:3128" in output  # registries need it
    assert "LANG=C.UTF-8" in output


def test_command_lines_and_output_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="rockpool"):
        run(["echo", "hello from a command"])
    assert "$ echo 'hello from a command'" in caplog.text
    assert "hello from a command" in caplog.text


def test_missing_tool() -> None:
    with pytest.raises(MissingTool, match="no-such-tool-here"):
        run(["no-such-tool-here"])


def test_contained_commands_get_private_pid_and_mount_namespaces() -> None:
    pid = run(contained(["bash", "-c", "echo $$"]), capture=True).stdout.strip()
    assert pid == "1"
