"""The stage cache: each stage's result, kept under the digest of its exact inputs.

Layout under the store root:
    cache/STAGE/KEY/entry.json   what the entry holds: each file's size and digest,
                                 and the facts the stage recorded
    cache/STAGE/KEY/FILE...      the stage's result (a root tarball, a disk, an output)

An entry is assembled in the build's staging directory and made visible in one rename,
so a reader never sees half of one. Every file is checked against entry.json before
use; an entry that fails the check is deleted and its stage runs again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rockpool.errors import InvalidInput
from rockpool.files import (
    fsync_directory,
    link_tree,
    move_aside,
    remove_tree,
    sha256_chunks,
    write_json_atomic,
)
from rockpool.store import Store
from rockpool.units import parse_size

log = logging.getLogger("rockpool.build.cache")

ENTRY = "entry.json"
ENTRY_SCHEMA = 1
DEFAULT_MAX_BYTES = 40 << 30


def allocated_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files)


@dataclass(frozen=True)
class CacheEntry:
    stage: str
    key: str
    path: Path
    files: dict[str, dict[str, Any]]
    facts: dict[str, Any]
    created: str
    problem: str | None = None  # why the entry cannot be used (shown by cache ls)

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def last_used(self) -> float:
        return self.path.stat().st_mtime

    @property
    def allocated(self) -> int:
        return allocated_bytes(self.path)

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "key": self.key,
            "path": str(self.path),
            "damaged": self.problem,
            "created": self.created,
            "last_used": dt.datetime.fromtimestamp(self.last_used, dt.UTC).isoformat(
                timespec="seconds"
            ),
            "allocated": self.allocated,
            "files": self.files,
        }


def _member_files(path: Path, name: str) -> dict[str, Path]:
    if path.is_file():
        return {name: path}
    return {
        f"{name}/{member.relative_to(path).as_posix()}": member
        for member in sorted(path.rglob("*"))
        if member.is_file()
    }


_KEY = re.compile(r"[0-9a-f]{64}")


def _unreadable(problem: str) -> ValueError:
    return ValueError(problem)


class StageCache:
    """Entries are added under the store's lock shared and pruned under it exclusive,
    so a build never restores an entry a prune is deleting."""

    def __init__(self, root: Path, store: Store | None = None) -> None:
        self.root = root
        self.store = store

    @classmethod
    def of_store(cls, store_root: Path) -> StageCache:
        return cls(store_root / "cache", Store(store_root))

    def locked(self, *, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        if self.store is None:
            return contextlib.nullcontext()
        return self.store.locked(exclusive=exclusive)

    def _entry_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def _read(self, path: Path) -> CacheEntry:
        """An entry as recorded; ValueError (and the like) when its record is damaged or
        names files outside its own directory."""
        data = json.loads((path / ENTRY).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
            raise _unreadable(f"{ENTRY} is not a record of files")
        if data.get("stage") != path.parent.name or data.get("key") != path.name:
            raise _unreadable(f"{ENTRY} names another entry")
        for name, record in data["files"].items():
            parts = name.split("/")
            if any(part in ("", ".", "..") for part in parts) or not isinstance(record, dict):
                raise _unreadable(f"{ENTRY} names a file outside the entry: {name!r}")
        return CacheEntry(
            stage=data["stage"],
            key=data["key"],
            path=path,
            files=data["files"],
            facts=data.get("facts", {}),
            created=str(data.get("created", "")),
        )

    def _damage(self, entry: CacheEntry) -> str | None:
        """What is wrong with an entry's files, or None when each matches its record."""
        for name, record in entry.files.items():
            member = entry.file(name)
            if not member.is_file():
                return f"{name} is missing"
            if member.stat().st_size != record["size"]:
                return f"{name} has {member.stat().st_size} bytes, not {record['size']}"
            if sha256_chunks(member) != record["digest"]:
                return f"{name} does not match its digest"
        return None

    def get(self, stage: str, key: str) -> CacheEntry | None:
        """The verified entry for key, or None; a damaged entry is removed."""
        path = self._entry_dir(stage, key)
        with self.locked(exclusive=False):
            if not path.is_dir() or path.is_symlink():
                return None
            try:
                entry = self._read(path)
                problem = self._damage(entry)
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
                problem = f"unreadable {ENTRY} ({exc})"
            if problem is not None:
                log.warning("cache: %s entry %s is damaged (%s); rebuilding", stage, key, problem)
                self.remove_path(path)
                return None
            os.utime(path)  # last use, for pruning
        log.info("cache: %s hit %s", stage, key)
        return entry

    def put(
        self,
        stage: str,
        key: str,
        files: Mapping[str, Path],
        facts: Mapping[str, Any],
        *,
        scratch: Path,
        known: Mapping[tuple[int, int], str] | None = None,
    ) -> CacheEntry:
        """Store files (hard links; a directory counts as its files) under key.

        scratch is a directory on the cache's filesystem (the build's staging directory)
        where the entry is assembled before its one rename into the cache. known maps
        (device, inode) to sha256_chunks digests the caller has computed already.
        """
        assembling = scratch / f"cache-{stage}-{uuid.uuid4().hex[:8]}"
        assembling.mkdir()
        records: dict[str, dict[str, Any]] = {}
        for name, source in files.items():
            link_tree(source, assembling / name)
            for member_name, member in _member_files(assembling / name, name).items():
                stat = member.stat()
                digest = (known or {}).get((stat.st_dev, stat.st_ino)) or sha256_chunks(member)
                records[member_name] = {"size": stat.st_size, "digest": digest}
        write_json_atomic(
            assembling / ENTRY,
            {
                "schema": ENTRY_SCHEMA,
                "stage": stage,
                "key": key,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "files": records,
                "facts": dict(facts),
            },
        )
        for member in assembling.rglob("*"):
            if member.is_file():
                with open(member, "rb") as handle:
                    os.fsync(handle.fileno())
        target = self._entry_dir(stage, key)
        with self.locked(exclusive=False):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(assembling, target)
            except OSError:  # another build stored the same key first; theirs is as good
                shutil.rmtree(assembling, ignore_errors=True)
            else:
                fsync_directory(target.parent)
        log.info("cache: %s stored %s", stage, key)
        return self._read(target)

    def alias(self, stage: str, key: str, other_key: str, *, scratch: Path) -> None:
        """File key's entry under other_key as well (hard links), if there is one."""
        if key == other_key or self._entry_dir(stage, other_key).is_dir():
            return
        entry = self.get(stage, key)
        if entry is None:
            return
        tops = {name.split("/", 1)[0] for name in entry.files}
        self.put(
            stage, other_key, {top: entry.file(top) for top in tops}, entry.facts, scratch=scratch
        )

    def entries(self) -> list[CacheEntry]:
        """Every entry, a damaged one included (with its problem): only prune, or a build
        that needs it, removes one."""
        found: list[CacheEntry] = []
        if not self.root.is_dir():
            return found
        for stage_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if stage_dir.name.startswith(".") or stage_dir.is_symlink():
                continue
            for path in sorted(p for p in stage_dir.iterdir() if p.is_dir()):
                if path.name.startswith(".") or path.is_symlink():
                    continue  # a removal under way
                try:
                    found.append(self._read(path))
                except FileNotFoundError:
                    continue  # removed meanwhile
                except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
                    found.append(
                        CacheEntry(
                            stage=stage_dir.name,
                            key=path.name,
                            path=path,
                            files={},
                            facts={},
                            created="",
                            problem=f"unreadable {ENTRY}: {exc}",
                        )
                    )
        return found

    def remove_path(self, path: Path) -> None:
        """Out of view in one rename, then deleted."""
        remove_tree(move_aside(path))

    def prune(self, max_bytes: int, *, stage: str | None = None) -> list[CacheEntry]:
        """Remove least recently used entries until the cache holds at most max_bytes.

        max_bytes 0 empties it (or one stage's entries). Damaged entries go first,
        whatever the size."""
        with self.locked(exclusive=True):
            self._sweep_trash()
            everything = self.entries()
            sizes = {e.path: e.allocated for e in everything}
            total = sum(sizes.values())
            removed: list[CacheEntry] = []
            candidates = [e for e in everything if stage is None or e.stage == stage]
            for entry in sorted(candidates, key=lambda e: (e.problem is None, e.last_used)):
                if total <= max_bytes and entry.problem is None:
                    break
                self.remove_path(entry.path)
                total -= sizes[entry.path]
                removed.append(entry)
            return removed

    def _sweep_trash(self) -> None:
        """Entries a killed prune left half-deleted (renamed out of view, older than
        a minute so a concurrent removal is not raced)."""
        if not self.root.is_dir():
            return
        for trash in self.root.glob("*/.removed-*"):
            if time.time() - trash.stat().st_mtime > 60:
                shutil.rmtree(trash, ignore_errors=True)


MAX_SIZE_VARIABLE = "ROCKPOOL_CACHE_MAX_SIZE"


def parse_max_size(text: str, source: str = "--max-size") -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise InvalidInput(f"{source}: {exc}", hint=f"e.g. {source}=20G") from None


def configured_max_bytes() -> int:
    """The bound every build prunes the cache to: $ROCKPOOL_CACHE_MAX_SIZE, else 40G."""
    value = os.environ.get(MAX_SIZE_VARIABLE)
    return DEFAULT_MAX_BYTES if value is None else parse_max_size(value, MAX_SIZE_VARIABLE)


# Stages whose results the cache keeps, in build order.
CACHED_STAGES = ("bootstrap", "provision", "disk")


@dataclass(frozen=True)
class StageKeys:
    """The digest of each stage's exact inputs, each including the one before it."""

    bootstrap: str
    provision: str
    disk: str
    formats: dict[str, str]
    # The node layer: Node.js, npm and code-server as setup.sh installs them (None:
    # setup.sh has no such section), reused when only the rest of setup.sh changed.
    node_layer: str | None = None

    def of(self, stage: str) -> str:
        key: str = getattr(self, stage)
        return key


@dataclass
class CachePlan:
    """Which stage's cached result the build starts from, and what each stage did."""

    cache: StageCache
    keys: StageKeys
    read: bool  # False for --force: every stage runs, and refreshes its entry
    start: CacheEntry | None = None  # the latest cached stage result to restore
    results: dict[str, str] = field(default_factory=dict)
    # The store's lock, shared, from finding the start until it is restored: no prune
    # deletes it in between.
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def release(self) -> None:
        self.hold.close()

    def find_start(self, until: str | None = None, *, need_root: bool = False) -> None:
        """The latest cached result to start from; with until, none after that stage;
        with need_root (a format reads the root tree), none after the provisioned root.
        Holds the store's lock shared until release(), when there is one to restore."""
        if not self.read:
            return
        self.hold.enter_context(self.cache.locked(exclusive=False))
        last = CACHED_STAGES.index(until) + 1 if until in CACHED_STAGES else len(CACHED_STAGES)
        if until == "preflight":
            last = 0
        if need_root:
            last = min(last, CACHED_STAGES.index("provision") + 1)
        for stage in reversed(CACHED_STAGES[:last]):
            entry = self.cache.get(stage, self.keys.of(stage))
            if entry is not None:
                self.start = entry
                return
        self.release()  # nothing to restore: a cold build holds no lock for its hour

    def covered(self, stage: str) -> bool:
        """The restored result already includes this stage's work."""
        if self.start is None:
            return False
        # The preflight checks the registries the bootstrap and provisioning use.
        stage = "bootstrap" if stage == "preflight" else stage
        return CACHED_STAGES.index(stage) < CACHED_STAGES.index(self.start.stage)

    def restores(self, stage: str) -> CacheEntry | None:
        return self.start if self.start is not None and self.start.stage == stage else None
