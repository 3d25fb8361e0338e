"""The CLI: one clear message, a documented exit code, no traceback, nothing stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def rockpool(*args: str, home: Path, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROCKPOOL_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "rockpool", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


def test_bad_spec_fails_with_one_message_and_stores_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "bad.toml"
    spec.write_text(
        (REPO / "images/workspace.toml")
        .read_text()
        .replace('disk_size = "20G"', 'disk_size = "twenty"')
    )
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts/setup.sh").write_text("#!/bin/bash\n")
    home = tmp_path / "store"
    result = rockpool("image", "build", str(spec), home=home)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{spec}: image.disk_size" in result.stderr
    assert result.stderr.count("error:") == 1
    assert not (home / "images").exists() or not any((home / "images").iterdir())


def test_missing_provisioning_script(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text((REPO / "images/workspace.toml").read_text())
    result = rockpool("image", "build", str(spec), "--json", home=tmp_path / "store")
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert "provision.script" in error["message"] and "not found" in error["message"]
    assert error["exit_code"] == 2


def test_spec_check_prints_the_resolved_spec(tmp_path: Path) -> None:
    result = rockpool("spec", "check", "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["name"] == "workspace" and resolved["code_server_version"]


def test_unknown_image_is_exit_3(tmp_path: Path) -> None:
    result = rockpool("image", "inspect", "workspace", home=tmp_path)
    assert result.returncode == 3
    assert "no image named 'workspace'" in result.stderr and "Traceback" not in result.stderr


def test_empty_store_lists_nothing(tmp_path: Path) -> None:
    result = rockpool("image", "ls", "--json", home=tmp_path)
    assert result.returncode == 0
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("argv", [["image", "frobnicate"], ["image", "build", "--no-such-flag"]])
def test_usage_errors_are_exit_2(tmp_path: Path, argv: list[str]) -> None:
    result = rockpool(*argv, home=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_bad_store_location_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "ROCKPOOL_HOME": "not/absolute"}
    result = subprocess.run(
        [sys.executable, "-m", "rockpool", "image", "ls"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "ROCKPOOL_HOME must be an absolute path" in result.stderr


def test_config_disk_rejects_bad_names(tmp_path: Path) -> None:
    result = rockpool("config-disk", str(tmp_path / "c.img"), "--name=-bad-", home=tmp_path)
    assert result.returncode == 2
    assert "invalid ROCKPOOL_WORKSPACE_NAME '-bad-'" in result.stderr
    assert not (tmp_path / "c.img").exists()


def build_args() -> list[str]:
    return ["image", "build", str(REPO / "images/workspace.toml")]


@pytest.mark.skipif(os.geteuid() != 0, reason="a build checks for root before its inputs")
def test_bad_environment_values_are_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "ROCKPOOL_HOME": str(tmp_path), "SOURCE_DATE_EPOCH": "yesterday"}
    result = subprocess.run(
        [sys.executable, "-m", "rockpool", *build_args()],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "SOURCE_DATE_EPOCH must be a Unix time" in result.stderr
    bad_bundle = tmp_path / "bundle.pem"
    bad_bundle.write_text("not a certificate")
    result = rockpool(*build_args(), "--ca-bundle", str(bad_bundle), home=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--ca-bundle" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "images").exists()


def test_tart_requests_fail_clearly_on_linux(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tart output for amd64, a missing tart, a name Tart cannot have, a bad runtime."""
    home = tmp_path / "store"
    spec = tmp_path / "amd64-tart.toml"
    spec.write_text(
        f'extends = "{REPO / "images/workspace.toml"}"\n'
        '[image]\nname = "x"\narchitecture = "amd64"\nformats = ["tart-oci"]\n'
    )
    result = rockpool("spec", "check", str(spec), home=home)
    assert result.returncode == 2 and "image.formats" in result.stderr
    assert "arm64" in result.stderr and "Traceback" not in result.stderr

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no tart here
    result = rockpool("workspace", "ls", "--runtime", "tart", home=home)
    assert result.returncode == 4, result.stderr
    assert "tart" in result.stderr and "brew install cirruslabs/cli/tart" in result.stderr

    result = rockpool("workspace", "create", "rockpool-x", "--runtime", "tart", home=home)
    assert result.returncode == 2 and "rockpool-" in result.stderr

    monkeypatch.setenv("ROCKPOOL_RUNTIME", "vmware")
    result = rockpool("workspace", "ls", home=home)
    assert result.returncode == 2 and "ROCKPOOL_RUNTIME" in result.stderr

    result = rockpool("image", "install", "nothing-here", "--runtime", "tart", home=home)
    assert result.returncode == 3 and "nothing-here" in result.stderr
    assert not (home / "images").exists() or not any((home / "images").iterdir())
