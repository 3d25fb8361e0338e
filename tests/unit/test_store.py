"""Store atomicity: versions appear whole or not at all, and dead builds are swept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rockpool.errors import InvalidInput, NotFound
from rockpool.store import Store, default_root


def prepared_version(store: Store, content: bytes) -> Path:
    directory = store.root / "prepared"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "disk.raw").write_bytes(content)
    return directory


def land(store: Store, version_id: str, content: bytes, created: str) -> None:
    manifest = {
        "created": created,
        "architecture": "amd64",
        "outputs": {"raw": {"file": "disk.raw", "size": len(content)}},
    }
    store.land("workspace", version_id, prepared_version(store, content), manifest)


def test_land_makes_an_immutable_version_and_moves_latest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    land(store, "aaaaaaaaaaaa", b"one", "2026-01-01T00:00:00+00:00")
    assert store.resolve("workspace").id == "aaaaaaaaaaaa"
    land(store, "bbbbbbbbbbbb", b"two", "2026-01-02T00:00:00+00:00")
    latest = store.resolve("workspace:latest")
    assert latest.id == "bbbbbbbbbbbb"
    assert latest.output_path("raw").read_bytes() == b"two"
    assert store.resolve("workspace:aaaaaaaaaaaa").output_path("raw").read_bytes() == b"one"
    assert [v.id for v in store.versions("workspace")] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]
    manifest = json.loads((latest.path / "manifest.json").read_text())
    assert manifest["name"] == "workspace" and manifest["version"] == "bbbbbbbbbbbb"


def test_landing_the_same_content_twice_keeps_one_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    land(store, "aaaaaaaaaaaa", b"one", "2026-01-01T00:00:00+00:00")
    land(store, "aaaaaaaaaaaa", b"one", "2026-01-03T00:00:00+00:00")
    assert len(store.versions("workspace")) == 1


def test_unknown_refs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(NotFound, match="no image named 'workspace'"):
        store.resolve("workspace")
    land(store, "aaaaaaaaaaaa", b"one", "2026-01-01T00:00:00+00:00")
    with pytest.raises(NotFound, match="does not exist"):
        store.resolve("workspace:0123456789ab")
    with pytest.raises(InvalidInput):
        store.resolve("workspace:not-a-version")
    with pytest.raises(InvalidInput):
        store.resolve("Bad Name")


def test_staging_is_removed_when_the_build_fails(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.staging() as work:
        (work / "root").mkdir()
        (work / "root" / "file").write_text("partial")
        raise RuntimeError("stage failed")
    assert list(store.staging_dir.iterdir()) == []
    assert store.image_names() == []


def test_a_killed_build_leaves_nothing_and_the_next_build_sweeps_it(tmp_path: Path) -> None:
    """kill -9 in the middle of staging: no version, and the stale directory is removed."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from rockpool.store import Store
        store = Store(Path({str(tmp_path)!r}))
        with store.staging() as work:
            (work / "disk.raw").write_bytes(b"x" * 4096)
            print(work, flush=True)
            time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    work = Path(child.stdout.readline().strip())
    assert work.is_dir()
    store = Store(tmp_path)
    assert store.remove_stale_staging() == []  # a live build's directory is left alone
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert work.is_dir()  # nobody cleaned up: the process died
    assert store.versions("workspace") == []
    with store.staging():
        assert not work.exists()  # swept when the next build starts
    assert list(store.staging_dir.iterdir()) == []


def test_a_failed_land_leaves_no_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path)

    def broken_rename(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError):
        land(store, "aaaaaaaaaaaa", b"one", "2026-01-01T00:00:00+00:00")
    assert store.versions("workspace") == []
    assert store.latest_id("workspace") is None


def test_store_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ROCKPOOL_HOME", str(tmp_path / "custom"))
    assert default_root() == tmp_path / "custom"
    monkeypatch.setenv("ROCKPOOL_HOME", "relative/path")
    with pytest.raises(InvalidInput, match="absolute"):
        default_root()
    monkeypatch.delenv("ROCKPOOL_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_root() == tmp_path / "xdg" / "rockpool"


def test_latest_is_repaired_after_a_crash_before_it_moved(tmp_path: Path) -> None:
    store = Store(tmp_path)
    land(store, "aaaaaaaaaaaa", b"one", "2026-01-01T00:00:00+00:00")
    land(store, "bbbbbbbbbbbb", b"two", "2026-01-02T00:00:00+00:00")
    store._point_latest("workspace", "aaaaaaaaaaaa")  # as if killed between rename and link
    store.repair_latest("workspace")
    assert store.latest_id("workspace") == "bbbbbbbbbbbb"


def test_concurrent_stagings_never_sweep_each_other(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.staging() as first, store.staging() as second:
        assert first.is_dir() and second.is_dir() and first != second
        assert store.remove_stale_staging() == []


LANDING_CHILD = """
import os, signal, sys
from pathlib import Path
from rockpool.store import Store

kill_at = int(sys.argv[2])
calls = [0]

def counted(real):
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return call

for name in ("rename", "replace", "symlink", "fsync"):
    setattr(os, name, counted(getattr(os, name)))
store = Store(Path(sys.argv[1]))
prepared = store.root / "prepared"
prepared.mkdir()
(prepared / "disk.raw").write_bytes(b"two")
manifest = {"architecture": "amd64", "input_digest": "d" * 64,
            "outputs": {"raw": {"file": "disk.raw", "size": 3}}}
store.land("workspace", "bbbbbbbbbbbb", prepared, manifest)
print(calls[0])
"""


def test_a_landing_killed_at_any_step_leaves_a_whole_store(tmp_path: Path) -> None:
    """kill -9 at every rename, replace, symlink and fsync of a landing in turn."""
    steps = None
    kill_at = 1
    while steps is None or kill_at <= steps:
        home = tmp_path / f"kill-{kill_at}"
        store = Store(home)
        land(store, "aaaaaaaaaaaa", b"one", "2026-01-01T00:00:00+00:00")
        child = subprocess.run(
            [sys.executable, "-c", LANDING_CHILD, str(home), str(kill_at)],
            capture_output=True,
            text=True,
        )
        if child.returncode == 0:  # it ran past the last step: that many steps in all
            steps = int(child.stdout)
            break
        assert child.returncode == -signal.SIGKILL, child.stderr
        # Whole: every version readable, latest one of them, nothing half landed.
        found = [v.id for v in store.versions("workspace")]
        assert found in (["aaaaaaaaaaaa"], ["aaaaaaaaaaaa", "bbbbbbbbbbbb"]), (kill_at, found)
        assert store.damaged("workspace") == []
        assert store.latest_id("workspace") in found
        # The next build lands it, and it is latest.
        store.repair_latest("workspace")
        land(store, "bbbbbbbbbbbb", b"two", "2026-01-02T00:00:00+00:00")
        assert store.resolve("workspace").id == "bbbbbbbbbbbb"
        assert store.resolve("workspace:bbbbbbbbbbbb").output_path("raw").read_bytes() == b"two"
        kill_at += 1
    assert steps is not None and steps >= 8  # every step was killed once
