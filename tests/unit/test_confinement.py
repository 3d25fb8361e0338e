"""Nothing outside the store is listed, followed, deleted or handed to QEMU, and damaged
records, manifests and cache entries are reported (path and fix), never fatal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rockpool.build.cache import StageCache
from rockpool.runtime.qemu import QemuRuntime
from rockpool.store import Store
from rockpool.tools import qemu
from rockpool.tools.kvm import Verdict
from tests.small_image import land_small_image


def rockpool(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rockpool", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ROCKPOOL_HOME": str(home)},
        timeout=120,
    )


def one_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    return result.stderr


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_latest_pointing_outside_the_store_is_never_followed(store: Store, tmp_path: Path) -> None:
    version = land_small_image(store)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "manifest.json").write_text('{"outputs": {}}')
    latest = store.images_dir / "small" / "latest"
    latest.unlink()
    latest.symlink_to(outside)
    assert store.latest_id("small") is None
    one_error(rockpool(store.root, "image", "rm", "small"), 3)
    assert (outside / "manifest.json").is_file()
    # Its version is still there, by id.
    assert rockpool(store.root, "image", "rm", version.ref).returncode == 0
    assert (outside / "manifest.json").is_file()


def test_names_that_are_paths_are_refused(store: Store) -> None:
    land_small_image(store)
    for name in ("../../x", "small/../..", "small\n", ".", "-x"):
        one_error(rockpool(store.root, "image", "ls", name), 2)
        one_error(rockpool(store.root, "workspace", "create", name, "--image", "small"), 2)
    one_error(rockpool(store.root, "image", "inspect", "small:../../etc"), 2)
    assert not (store.root / "workspaces").exists() or os.listdir(store.root / "workspaces") == []


def test_a_manifest_naming_files_elsewhere_is_damaged(store: Store) -> None:
    good = land_small_image(store)
    bad = land_small_image(store)
    manifest = json.loads((bad.path / "manifest.json").read_text())
    manifest["outputs"]["qcow2"]["file"] = "../../../etc/passwd"
    (bad.path / "manifest.json").write_text(json.dumps(manifest))
    assert [v.id for v in store.versions("small")] == [good.id]
    listed = rockpool(store.root, "image", "ls", "--json")
    assert listed.returncode == 0
    assert [row["image"] for row in json.loads(listed.stdout)] == [good.ref]
    assert f"{bad.path}/manifest.json" in listed.stderr and "image rm" in listed.stderr
    error = one_error(rockpool(store.root, "workspace", "create", "w", "--image", bad.ref), 7)
    assert "outputs.qcow2 names no file of the version's own" in error
    assert rockpool(store.root, "image", "rm", bad.ref).returncode == 0
    assert not bad.path.exists() and Path("/etc/passwd").exists()


@pytest.mark.parametrize("content", ["[]", "{", "null", '{"outputs": 3}', "\udcff"])
def test_a_damaged_manifest_blocks_nothing(store: Store, content: str) -> None:
    good = land_small_image(store)
    bad = land_small_image(store)
    (bad.path / "manifest.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    assert rockpool(store.root, "image", "ls").returncode == 0
    gc = rockpool(store.root, "image", "gc", "--json")
    assert gc.returncode == 0, gc.stderr
    assert any(str(bad.path) in warning for warning in json.loads(gc.stdout)["warnings"])
    assert bad.path.is_dir()  # skipped, not deleted behind the user's back
    one_error(rockpool(store.root, "image", "inspect", bad.ref), 7)
    assert rockpool(store.root, "image", "rm", bad.ref).returncode == 0
    assert store.resolve("small").id == good.id


@pytest.mark.parametrize(
    "record",
    [
        b"not json",
        b"[]",
        b'{"name": "alice"}',
        json.dumps({"mac": "52:54:00:00:00:01,romfile=/etc/shadow"}).encode(),
        json.dumps({"cpus": "1; rm -rf /"}).encode(),
        json.dumps({"instance_id": "a\\cb"}).encode(),
    ],
)
def test_a_damaged_workspace_record_is_reported_and_removable(store: Store, record: bytes) -> None:
    land_small_image(store)
    assert rockpool(store.root, "workspace", "create", "alice", "--image", "small").returncode == 0
    assert rockpool(store.root, "workspace", "create", "bob", "--image", "small").returncode == 0
    path = store.root / "workspaces" / "alice" / "workspace.json"
    original = json.loads(path.read_text())
    if record.startswith(b"{") and record != b'{"name": "alice"}':
        record = json.dumps({**original, **json.loads(record)}).encode()
    path.write_bytes(record)
    listed = rockpool(store.root, "workspace", "ls", "--json")
    assert listed.returncode == 0
    assert [w["name"] for w in json.loads(listed.stdout)] == ["bob"]
    assert str(path) in listed.stderr and "rm --force alice" in listed.stderr
    error = one_error(rockpool(store.root, "workspace", "start", "alice"), 7)
    assert str(path) in error
    one_error(rockpool(store.root, "workspace", "rm", "alice"), 7)
    gc = rockpool(store.root, "image", "gc", "--json")
    assert gc.returncode == 0 and json.loads(gc.stdout)["removed"] == []
    assert rockpool(store.root, "workspace", "rm", "--force", "alice").returncode == 0
    assert not path.parent.exists()
    assert rockpool(store.root, "workspace", "status", "bob").returncode == 0


def test_qemu_gets_escaped_paths_and_short_sockets(tmp_path: Path) -> None:
    store = Store(tmp_path / "a,b" / ("long" * 20) / "store")
    land_small_image(store)
    runtime = QemuRuntime(store)
    name = "w" * 63  # the longest valid name
    runtime.create(name, "small")
    record = json.loads((store.root / "workspaces" / name / "workspace.json").read_text())
    vm = runtime._vm(name, record)
    argv = vm.argv(Verdict("tcg", "test"))
    drives = [a for a in argv if a.startswith("if=none,id=root")]
    assert drives and "a,,b" in drives[0] and "file=" in drives[0]
    assert all(",romfile" not in a for a in argv)
    assert len(str(vm.qmp_socket).encode()) <= qemu.SOCKET_PATH_LIMIT
    assert not str(vm.qmp_socket).startswith(str(store.root))


def test_cache_ls_shows_a_damaged_entry_and_prune_removes_it(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    cache = StageCache.of_store(store.root)
    source = tmp_path / "root.tar"
    source.write_bytes(b"root" * 100)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    entry = cache.put("bootstrap", "a" * 64, {"root.tar": source}, {}, scratch=scratch)
    (entry.path / "entry.json").write_text("{broken")
    listed = rockpool(store.root, "cache", "ls", "--json")
    assert listed.returncode == 0
    rows = json.loads(listed.stdout)["entries"]
    assert len(rows) == 1 and rows[0]["damaged"].startswith("unreadable entry.json")
    assert entry.path.is_dir()  # listing deletes nothing
    assert "damaged" in listed.stderr
    pruned = rockpool(store.root, "cache", "prune", "--json")  # over no size: only damage
    assert json.loads(pruned.stdout)["removed"] == [{"stage": "bootstrap", "key": "a" * 64}]
    assert not entry.path.exists()
