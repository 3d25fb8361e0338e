"""What a build's bytes must not depend on, what a version records of its inputs, and
`image verify`'s checks before it rebuilds (the rebuild itself: tests/e2e)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rockpool import host
from rockpool.build.disk import UPDATED_MARKERS, clamp_mtimes, mark_updated
from rockpool.build.keys import all_stage_code, code_files
from rockpool.build.outputs import INPUTS_DIR, RECORDED_LOCK, RECORDED_SETUP
from rockpool.build.plan import BuildPlan
from rockpool.errors import NotFound
from rockpool.files import image_directory
from rockpool.reproduce import explanations, recorded_plan
from rockpool.spec import load_spec
from rockpool.store import Store, Version
from rockpool.tools import BYTE_WRITERS

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "tests" / "specs" / "small.toml"


def test_image_directories_ignore_the_builders_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        image_directory(tmp_path / "etc" / "initramfs" / "post-update.d")
    finally:
        os.umask(old)
    for made in ("etc", "etc/initramfs", "etc/initramfs/post-update.d"):
        assert (tmp_path / made).stat().st_mode & 0o777 == 0o755, made


def test_the_root_is_marked_up_to_date_with_usr_as_the_disk_holds_it(tmp_path: Path) -> None:
    """systemd skips its ConditionNeedsUpdate= units only when /etc/.updated and
    /var/.updated hold /usr's mtime; the disk holds /usr at the clamped time."""
    epoch = 1_700_000_000
    for directory in ("usr", "etc", "var"):
        (tmp_path / directory).mkdir()
    os.utime(tmp_path / "usr", (epoch + 500, epoch + 500))  # touched after the epoch
    mark_updated(tmp_path, epoch)
    clamp_mtimes(tmp_path, epoch)
    usr_ns = (tmp_path / "usr").stat().st_mtime_ns
    assert usr_ns == epoch * 1_000_000_000
    for relative in UPDATED_MARKERS:
        marker = tmp_path / relative
        assert f"TIMESTAMP_NSEC={usr_ns}\n" in marker.read_text()
        assert marker.stat().st_mtime_ns == usr_ns
        assert marker.stat().st_mode & 0o777 == 0o644

    os.utime(tmp_path / "usr", (epoch - 500, epoch - 500))  # older than the epoch
    mark_updated(tmp_path, epoch)
    assert (
        f"TIMESTAMP_NSEC={(epoch - 500) * 1_000_000_000}\n"
        in (tmp_path / "etc" / ".updated").read_text()
    )


def test_the_image_writing_tools_are_named_with_their_libraries() -> None:
    """qemu-img's deflate is zlib's: a zlib update can change the qcow2's bytes."""
    formats = host.package_versions(BYTE_WRITERS["formats"])
    disk = host.package_versions(BYTE_WRITERS["disk"])
    installed = subprocess.run(
        ["dpkg-query", "--show", "--showformat", "${Version}", "qemu-utils"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert formats["qemu-utils"] == installed
    assert "zlib1g" in formats
    assert {"e2fsprogs", "mtools", "dosfstools", "fdisk", "faketime"} <= set(disk)
    assert "libext2fs2" in disk or "libext2fs2t64" in disk


def test_a_spec_round_trips_through_the_manifest(tmp_path: Path) -> None:
    spec = load_spec(SMALL)
    script = tmp_path / "setup.sh"
    again = type(spec).from_json(spec.to_json(), setup_script=script)
    assert again == type(spec)(**{**spec.__dict__, "setup_script": script})


def _version(store: Store, manifest: dict[str, Any], *, inputs: bool = True) -> Version:
    prepared = store.root / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "disk.raw").write_bytes(b"disk")
    if inputs:
        (prepared / INPUTS_DIR).mkdir()
        (prepared / INPUTS_DIR / RECORDED_SETUP).write_bytes(
            Path(str(load_spec(SMALL).setup_script)).read_bytes()
        )
    return store.land("test-small", "aaaaaaaaaaaa", prepared, manifest)


def _manifest(plan: BuildPlan) -> dict[str, Any]:
    return {
        "created": "2026-12-02T00:00:00+00:00",
        "architecture": plan.spec.architecture,
        "source_date_epoch": 1_795_486_335,
        "spec": plan.spec.to_json(),
        "outputs": {"raw": {"file": "disk.raw", "sha256": "x"}},
        "inputs": {
            "setup_script": plan.setup.sha256,
            "locked": False,
            "code": code_files(all_stage_code()),
        },
        "build_host": {"tools": plan.host_tools},
        "rockpool_version": "0.1.0",
    }


def test_verify_rebuilds_from_what_the_version_recorded(tmp_path: Path) -> None:
    plan = BuildPlan.resolve(load_spec(SMALL))
    version = _version(Store(tmp_path), _manifest(plan))
    recorded = recorded_plan(version)
    assert recorded.spec.setup_script == version.path / INPUTS_DIR / RECORDED_SETUP
    assert recorded.setup.sha256 == plan.setup.sha256
    assert recorded.epoch_override == 1_795_486_335  # the version's, not today's archive
    assert recorded.lock is None and not (version.path / INPUTS_DIR / RECORDED_LOCK).exists()
    # The same code and host tools: only the missing lock is worth a note.
    assert explanations(version, recorded) == [
        "it was built without a lock: the rebuild installs what the archive and the npm "
        "registry serve today"
    ]


def test_verify_names_other_code_and_other_tools_first(tmp_path: Path) -> None:
    plan = BuildPlan.resolve(load_spec(SMALL))
    manifest = _manifest(plan)
    manifest["inputs"]["code"] = {**code_files(all_stage_code()), "build/disk.py": "0" * 64}
    manifest["build_host"] = {"tools": {**plan.host_tools, "e2fsprogs": "1.46.0-1"}}
    version = _version(Store(tmp_path), manifest)
    notes = explanations(version, recorded_plan(version))
    assert notes[0].startswith("the build code differs (built by rockpool 0.1.0): build/disk.py")
    assert notes[1] == (
        "the host's image-writing tools differ: "
        f"e2fsprogs: 1.46.0-1 -> {plan.host_tools['e2fsprogs']}"
    )


def test_a_version_without_recorded_inputs_is_a_clear_error(tmp_path: Path) -> None:
    old: dict[str, Any] = {"created": "x", "architecture": "amd64", "outputs": {}}
    version = _version(Store(tmp_path), old, inputs=False)
    with pytest.raises(NotFound, match="records no build inputs"):
        recorded_plan(version)
    result = subprocess.run(
        [sys.executable, "-m", "rockpool", "image", "verify", version.ref],
        capture_output=True,
        text=True,
        env={**os.environ, "ROCKPOOL_HOME": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == 3
    assert "records no build inputs" in result.stderr and "Traceback" not in result.stderr
