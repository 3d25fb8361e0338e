"""The config disk: a real FAT image with the label and files the guest reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rockpool.carrier import LABEL, render_env, validate_env, write_carrier
from rockpool.errors import InvalidInput
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
    image = write_carrier(
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
