"""The stage cache: entries appear whole, are verified before use, and are pruned LRU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rockpool.build.cache import CachePlan, StageCache, StageKeys, parse_max_size
from rockpool.errors import InvalidInput
from rockpool.files import sha256_chunks


def payload(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / "work" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def cache(tmp_path: Path) -> StageCache:
    return StageCache(tmp_path / "cache")


def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir(exist_ok=True)
    return path


def test_put_then_get_returns_the_files_and_facts(cache: StageCache, tmp_path: Path) -> None:
    source = payload(tmp_path, "root.tar", b"root" * 1000)
    cache.put(
        "bootstrap", "k1", {"root.tar": source}, {"kernel": "6.12"}, scratch=scratch(tmp_path)
    )
    entry = cache.get("bootstrap", "k1")
    assert entry is not None
    assert entry.file("root.tar").read_bytes() == b"root" * 1000
    assert entry.facts == {"kernel": "6.12"}
    assert entry.file("root.tar").stat().st_ino == source.stat().st_ino  # a hard link
    assert cache.get("bootstrap", "other") is None
    assert list((tmp_path / "staging").iterdir()) == []  # assembled, then renamed away


def test_directory_outputs_are_stored_file_by_file(cache: StageCache, tmp_path: Path) -> None:
    bundle = tmp_path / "work" / "tart"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    (bundle / "disk.img").write_bytes(b"disk")
    entry = cache.put("formats", "k", {"tart": bundle}, {"file": "tart"}, scratch=scratch(tmp_path))
    assert sorted(entry.files) == ["tart/config.json", "tart/disk.img"]
    assert cache.get("formats", "k") is not None


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(b"ROOT" + p.read_bytes()[4:]),  # same size, other bytes
        lambda p: os.truncate(p, 10),  # truncated
        lambda p: p.unlink(),  # missing
    ],
    ids=["flipped", "truncated", "missing"],
)
def test_a_damaged_entry_is_removed_not_used(
    cache: StageCache, tmp_path: Path, damage: object
) -> None:
    source = payload(tmp_path, "root.tar", b"root" * 1000)
    entry = cache.put("provision", "k", {"root.tar": source}, {}, scratch=scratch(tmp_path))
    source.unlink()  # break the hard link so damage reaches the cache's copy only
    assert callable(damage)
    damage(entry.file("root.tar"))
    assert cache.get("provision", "k") is None
    assert not entry.path.exists()


def test_an_unreadable_entry_record_is_removed(cache: StageCache, tmp_path: Path) -> None:
    source = payload(tmp_path, "disk.raw", b"x")
    entry = cache.put("disk", "k", {"disk.raw": source}, {}, scratch=scratch(tmp_path))
    (entry.path / "entry.json").write_text("{not json")
    assert cache.get("disk", "k") is None
    assert not entry.path.exists()


def test_prune_removes_least_recently_used_first(cache: StageCache, tmp_path: Path) -> None:
    for index, key in enumerate(("old", "mid", "new")):
        source = payload(tmp_path, f"{key}.tar", os.urandom(64 << 10))
        entry = cache.put("bootstrap", key, {"root.tar": source}, {}, scratch=scratch(tmp_path))
        source.unlink()
        os.utime(entry.path, (1_000_000 + index, 1_000_000 + index))
    cache.get("bootstrap", "old")  # a hit makes it the most recently used
    one_entry = max(e.allocated for e in cache.entries())
    removed = cache.prune(2 * one_entry)
    assert [e.key for e in removed] == ["mid"]
    assert sorted(e.key for e in cache.entries()) == ["new", "old"]
    assert cache.prune(0, stage="disk") == []
    assert len(cache.prune(0)) == 2
    assert cache.entries() == []


def test_plan_starts_from_the_latest_cached_stage(cache: StageCache, tmp_path: Path) -> None:
    keys = StageKeys("b", "p", "d", {"raw": "r"})
    tar = payload(tmp_path, "root.tar", b"root")
    cache.put("bootstrap", "b", {"root.tar": tar}, {}, scratch=scratch(tmp_path))
    plan = CachePlan(cache, keys, read=True)
    plan.find_start()
    assert plan.start is not None and plan.start.stage == "bootstrap"
    assert plan.restores("bootstrap") is plan.start
    assert [s for s in ("preflight", "bootstrap", "provision", "disk") if plan.covered(s)] == []
    cache.put("provision", "p", {"root.tar": tar}, {}, scratch=scratch(tmp_path))
    plan = CachePlan(cache, keys, read=True)
    plan.find_start()
    assert plan.start is not None and plan.start.stage == "provision"
    assert [s for s in ("preflight", "bootstrap", "provision", "disk") if plan.covered(s)] == [
        "preflight",
        "bootstrap",
    ]
    forced = CachePlan(cache, keys, read=False)
    forced.find_start()
    assert forced.start is None
    # With the disk cached too, a format that reads the root tree starts at the root.
    cache.put(
        "disk",
        "d",
        {"disk.raw": payload(tmp_path, "disk.raw", b"disk")},
        {},
        scratch=scratch(tmp_path),
    )
    plan = CachePlan(cache, keys, read=True)
    plan.find_start()
    assert plan.start is not None and plan.start.stage == "disk"
    plan.release()
    plan = CachePlan(cache, keys, read=True)
    plan.find_start(need_root=True)
    assert plan.start is not None and plan.start.stage == "provision"
    plan.release()


def test_entry_records_are_json_with_each_files_digest(cache: StageCache, tmp_path: Path) -> None:
    source = payload(tmp_path, "disk.raw", b"disk")
    entry = cache.put("disk", "k", {"disk.raw": source}, {"a": 1}, scratch=scratch(tmp_path))
    record = json.loads((entry.path / "entry.json").read_text())
    assert record["files"]["disk.raw"] == {"size": 4, "digest": sha256_chunks(source)}


def test_max_size_errors_name_the_setting() -> None:
    assert parse_max_size("20G") == 20 << 30
    with pytest.raises(InvalidInput, match="ROCKPOOL_CACHE_MAX_SIZE"):
        parse_max_size("lots", "ROCKPOOL_CACHE_MAX_SIZE")


def test_a_cold_plan_holds_no_store_lock(tmp_path: Path) -> None:
    """A build with nothing cached must not hold the store lock while it runs: image gc
    and rm would wait for its hour."""
    from rockpool.store import Store

    store = Store(tmp_path / "store")
    keys = StageKeys("a" * 64, "b" * 64, "c" * 64, {}, None)
    plan = CachePlan(StageCache.of_store(store.root), keys, read=True)
    plan.find_start()
    assert plan.start is None
    with store.locked(exclusive=True):  # would deadlock against a held shared lock
        pass
    assert not store.holds_exclusive()
