"""The host's readiness: a build names what it lacks, with the package and the command
that installs it, before any slow work; `host check` reports each job."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rockpool import cli, host
from rockpool.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]
ARM64_SPEC = REPO / "tests/specs/arm64.toml"
SMALL_SPEC = REPO / "tests/specs/small.toml"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a build checks for root first")


def without(monkeypatch: pytest.MonkeyPatch, *programs: str) -> None:
    real = shutil.which

    def which(program: str, mode: int = os.F_OK | os.X_OK, path: str | None = None) -> str | None:
        return None if program in programs else real(program, mode, path)

    monkeypatch.setattr("rockpool.tools.shutil.which", which)


def build_json(
    spec: Path, home: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, dict[str, object]]:
    os.environ["ROCKPOOL_HOME"] = str(home)
    try:
        code = cli.main(["-q", "image", "build", str(spec), "--json", *extra])
    finally:
        del os.environ["ROCKPOOL_HOME"]
    return code, json.loads(capsys.readouterr().out)


@needs_root
def test_a_cross_build_without_arch_test_stops_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(host, "host_architecture", lambda: "amd64")
    without(monkeypatch, "arch-test")
    code, out = build_json(ARM64_SPEC, tmp_path / "store", capsys)
    assert code == ExitCode.MISSING_TOOL and int(code) == 4
    error = out["error"]
    assert isinstance(error, dict)
    assert "arch-test" in error["message"] and "test-arm64 (arm64)" in error["message"]
    assert "apt-get install arch-test" in error["hint"]
    assert "rockpool host setup" in error["hint"]
    # Named before the build touched the store: no staging directory, no log.
    assert not (tmp_path / "store").exists() or list((tmp_path / "store").rglob("*")) == []


@needs_root
def test_a_cross_build_without_binfmt_support_stops_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(host, "host_architecture", lambda: "amd64")
    monkeypatch.setattr(host, "BINFMT_MISC", tmp_path / "binfmt_misc")  # nothing registered
    code, out = build_json(ARM64_SPEC, tmp_path / "store", capsys)
    assert code == 4
    error = out["error"]
    assert isinstance(error, dict)
    assert "binfmt_misc has no qemu-aarch64 entry" in error["message"]
    assert "rockpool host setup" in error["hint"]


@needs_root
def test_a_missing_format_program_is_named_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without(monkeypatch, "qemu-img", "faketime")
    code, out = build_json(SMALL_SPEC, tmp_path / "store", capsys)
    assert code == 4
    error = out["error"]
    assert isinstance(error, dict)
    assert "faketime, qemu-img" in error["message"]
    assert "apt-get install faketime qemu-utils" in error["hint"]


def test_host_check_reports_each_job(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    without(monkeypatch, "skopeo", "caddy")
    code = cli.main(["host", "check", "--with-tests", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 4 and report["ok"] is False
    assert report["jobs"]["push"]["missing"] == {"skopeo": "skopeo"}
    assert report["jobs"]["tests"]["missing"] == {"caddy": "caddy"}
    assert set(report["jobs"]) >= {"build-amd64", "build-arm64", "workspaces-amd64", "push"}
    code = cli.main(["host", "check"])
    text = capsys.readouterr().out
    assert code == 4 and "skopeo (skopeo)" in text and "apt-get install skopeo" in text
    assert "tests" not in text  # only with --with-tests
