"""The config disk: a real FAT image with the label and files the guest reads."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rockpool.config_disk import (
    ENV_LIMIT,
    LABEL,
    VALUE_LIMIT,
    make_config_disk,
    render_env,
    validate_env,
)
from rockpool.errors import InvalidInput
from rockpool.keys import KEYS_LIMIT
from rockpool.names import is_slug


@pytest.mark.parametrize("name", ["a", "alice", "a-b-9", "x" * 63, "0day"])
def test_valid_names(name: str) -> None:
    assert is_slug(name)


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a.b", "x" * 64, "ä", "a b"])
def test_invalid_names(name: str) -> None:
    assert not is_slug(name)
    with pytest.raises(InvalidInput):
        validate_env({"ROCKPOOL_WORKSPACE_NAME": name})


def test_env_rules() -> None:
    with pytest.raises(InvalidInput, match="required"):
        validate_env({"ROCKPOOL_OTHER": "x"})
    with pytest.raises(InvalidInput, match="ROCKPOOL_"):
        validate_env({"ROCKPOOL_WORKSPACE_NAME": "a", "PATH": "/evil"})
    with pytest.raises(InvalidInput, match="one line"):
        validate_env({"ROCKPOOL_WORKSPACE_NAME": "a", "ROCKPOOL_X": "two\nlines"})
    assert render_env({"ROCKPOOL_WORKSPACE_NAME": "a", "ROCKPOOL_A": "1"}) == (
        "ROCKPOOL_A=1\nROCKPOOL_WORKSPACE_NAME=a\n"
    )


def mtype(image: Path, name: str) -> str:
    return subprocess.run(
        ["mtype", "-i", str(image), f"::/{name}"],
        capture_output=True,
        text=True,
        check=True,
        env={"MTOOLS_SKIP_CHECK": "1"},
    ).stdout


def test_written_disk_has_label_env_and_keys(tmp_path: Path) -> None:
    image = make_config_disk(
        tmp_path / "config.img",
        {"ROCKPOOL_WORKSPACE_NAME": "alice", "ROCKPOOL_TEAM": "blue"},
        "ssh-ed25519 AAAAtest user@host",
    )
    label = subprocess.run(
        ["blkid", "-o", "value", "-s", "LABEL", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert label == LABEL
    assert mtype(image, "env") == "ROCKPOOL_TEAM=blue\nROCKPOOL_WORKSPACE_NAME=alice\n"
    assert mtype(image, "authorized_keys") == "ssh-ed25519 AAAAtest user@host\n"
    assert not list(tmp_path.glob(".*.tmp"))


# ---- size caps: on the host, before anything is written ------------------------------


def env_of_size(size: int) -> dict[str, str]:
    """A valid env whose rendered file is exactly size bytes, no value over VALUE_LIMIT."""
    env = {"ROCKPOOL_WORKSPACE_NAME": "alice"}
    left = size - len(render_env(env))
    index = 0
    while left:
        key = f"ROCKPOOL_V{index:04d}"
        overhead = len(key) + 2  # '=' and '\n'
        # Leave at least one more line's overhead, or take all that is left.
        take = min(VALUE_LIMIT, left - overhead)
        if 0 < left - overhead - take < overhead + 1:
            take -= overhead + 1
        env[key] = "v" * take
        left -= overhead + take
        index += 1
    assert len(render_env(env)) == size
    return env


def test_value_cap_names_the_key_and_the_limit() -> None:
    base = {"ROCKPOOL_WORKSPACE_NAME": "alice"}
    assert validate_env({**base, "ROCKPOOL_BLOB": "x" * VALUE_LIMIT})["ROCKPOOL_BLOB"]
    with pytest.raises(InvalidInput) as caught:
        validate_env({**base, "ROCKPOOL_BLOB": "x" * (VALUE_LIMIT + 1)})
    message = str(caught.value)
    assert "ROCKPOOL_BLOB is 4097 bytes" in message and "limit of 4096 bytes" in message
    assert "fetch it inside the workspace" in message  # the hint
    # A large non-ASCII value is refused for what it is, not for its length.
    with pytest.raises(InvalidInput, match="printable ASCII"):
        validate_env({**base, "ROCKPOOL_BLOB": "é" * VALUE_LIMIT})


def test_env_cap_counts_the_rendered_file() -> None:
    assert VALUE_LIMIT == 4096 and ENV_LIMIT == 64 << 10
    validate_env(env_of_size(ENV_LIMIT))
    with pytest.raises(InvalidInput) as caught:
        validate_env(env_of_size(ENV_LIMIT + 1))
    message = str(caught.value)
    assert f"{ENV_LIMIT + 1} bytes" in message and "limit of 65536 bytes (64 KiB)" in message
    assert "fetch it inside the workspace" in message


@pytest.mark.parametrize(
    "env",
    [
        {"ROCKPOOL_WORKSPACE_NAME": "alice", "ROCKPOOL_BLOB": "x" * 1_500_000},
        env_of_size(ENV_LIMIT + 1),
    ],
    ids=["value", "env"],
)
def test_oversized_input_writes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    target = tmp_path / "config.img"
    with pytest.raises(InvalidInput, match="over the limit"):
        make_config_disk(target, env, "ssh-ed25519 AAAAtest user@host")
    assert not target.exists()
    assert not list(tmp_path.iterdir())


def test_the_disk_holds_the_largest_valid_input(tmp_path: Path) -> None:
    env = env_of_size(ENV_LIMIT)
    line = "ssh-ed25519 " + "A" * 68 + " user@host\n"
    keys = line * (KEYS_LIMIT // len(line))
    image = make_config_disk(tmp_path / "config.img", env, keys)
    assert mtype(image, "env") == render_env(env)
    assert mtype(image, "authorized_keys") == keys


# ---- the same caps in the guest: rockpool-init's parser, run here with bash ----------

SETUP_SH = Path(__file__).resolve().parents[2] / "images" / "scripts" / "setup.sh"
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def guest_parser() -> str:
    """rockpool-init's caps, messages and read_env, cut from the heredoc in setup.sh."""
    text = SETUP_SH.read_text()
    init = text.split("<<'INIT'\n", 1)[1].split("\nINIT\n", 1)[0]
    parts = [
        *re.findall(r"^(?:ENV_LIMIT|VALUE_LIMIT)=.*$", init, re.M),
        *re.findall(r"^(?:fail|warn)\(\) \{.*\}$", init, re.M),
        *re.findall(r"^read_env\(\) \{\n.*?^\}$", init, re.M | re.S),
    ]
    assert len(parts) == 5, "setup.sh's rockpool-init no longer has what this test runs"
    return "\n".join(parts)


DRIVER = """
declare -A values=()
read_env "$1"
for key in "${!values[@]}"; do printf '%s=%s\\n' "$key" "${values[$key]}"; done
"""


def run_guest_parser(path: Path) -> tuple[int, dict[str, str], str]:
    """(exit status, the variables read_env keeps, its messages) for the env file path."""
    script = "set -euo pipefail\n" + guest_parser() + DRIVER
    # A UTF-8 locale, as the guest may have: the caps are in bytes all the same.
    done = subprocess.run(
        ["bash", "-c", script, "read_env", str(path)],
        capture_output=True,
        text=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
    )
    kept = dict(line.split("=", 1) for line in done.stdout.splitlines())
    return done.returncode, kept, done.stderr


@needs_bash
def test_guest_caps_are_the_hosts() -> None:
    done = subprocess.run(
        ["bash", "-c", guest_parser() + '\necho "$ENV_LIMIT $VALUE_LIMIT"'],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == [str(ENV_LIMIT), str(VALUE_LIMIT)]


@needs_bash
def test_guest_reads_what_the_host_writes(tmp_path: Path) -> None:
    env = {"ROCKPOOL_WORKSPACE_NAME": "alice", "ROCKPOOL_TEAM": "blue", "ROCKPOOL_MAX": "m" * 4096}
    path = tmp_path / "env"
    path.write_text("# a comment\r\n\n" + render_env(env).replace("TEAM=blue\n", "TEAM=blue\r\n"))
    assert run_guest_parser(path) == (0, env, "")


@needs_bash
def test_guest_leaves_out_a_long_value_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_bytes(
        b"ROCKPOOL_WORKSPACE_NAME=alice\n"
        + b"ROCKPOOL_BLOB=" + b"x" * (VALUE_LIMIT + 1) + b"\n"
        + b"ROCKPOOL_WIDE=" + "é".encode() * 3000 + b"\n"  # 3000 characters, 6000 bytes
        + b"ROCKPOOL_TEAM=blue\n"
    )  # fmt: skip
    status, kept, messages = run_guest_parser(path)
    assert status == 0
    assert kept == {"ROCKPOOL_WORKSPACE_NAME": "alice", "ROCKPOOL_TEAM": "blue"}
    assert "env line 2: ROCKPOOL_BLOB is 4097 bytes, over the limit of 4096" in messages
    assert "env line 3: ROCKPOOL_WIDE is 6000 bytes, over the limit of 4096" in messages


@needs_bash
@pytest.mark.parametrize("size", ["value", "lines"])
def test_guest_ignores_an_oversized_env_file(tmp_path: Path, size: str) -> None:
    """Over ENV_LIMIT, none of the file is read: one huge value or many small lines."""
    path = tmp_path / "env"
    if size == "value":  # the 1.5 MB value that once held up the boot for 98 s
        content = "ROCKPOOL_WORKSPACE_NAME=alice\nROCKPOOL_BLOB=" + "x" * 1_500_000 + "\n"
    else:
        content = render_env(env_of_size(ENV_LIMIT + 1))
    path.write_text(content)
    status, kept, messages = run_guest_parser(path)
    # No variables: the service then fails on the missing ROCKPOOL_WORKSPACE_NAME.
    assert (status, kept) == (0, {})
    assert f"env file is {len(content)} bytes, over the limit of {ENV_LIMIT}" in messages
    # Exactly at the limit, all of it is read.
    path.write_text(render_env(env_of_size(ENV_LIMIT)))
    assert run_guest_parser(path) == (0, env_of_size(ENV_LIMIT), "")


@needs_bash
def test_guest_still_fails_on_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("ROCKPOOL_WORKSPACE_NAME=alice\nPATH=/evil\n")
    status, _, messages = run_guest_parser(path)
    assert status == 1 and "env line 2 is not ROCKPOOL_NAME=value: PATH=/evil" in messages
