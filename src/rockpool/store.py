"""The local image store: immutable versions, each landed atomically, and NAME:latest.

Layout under the store root ($ROCKPOOL_HOME, else $XDG_DATA_HOME/rockpool):
    images/NAME/VERSION/manifest.json   one immutable version and its outputs
    images/NAME/latest -> VERSION        the newest version
    images/NAME/.inputs/DIGEST -> VERSION  which version each set of build inputs gave
    staging/ID/ + staging/ID.lock        builds in progress; a lock not held is stale
    .lock                                the store's lock (Store.locked)

The root is 0700, made so when it is made, and what holds a workspace's secrets
(records, keys, config disks, logs) is created 0600: nothing in a store is readable by
another local user (docs/security.md).

One lock discipline: what adds a reference to a version or a layer (a workspace create
or clone, a build's landing) holds the store's lock shared; what deletes them (image rm,
image gc, removing unused layers, cache prune) holds it exclusive, and sees only whole
states. A workspace's own lock is always taken before the store's, never inside it.

Every name, version id and pointer read from disk is checked before use, so nothing
outside the store is ever listed, followed or deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rockpool.errors import Damaged, InvalidInput, NotFound
from rockpool.files import (
    fsync_directory,
    move_aside,
    private_directory,
    remove_tree,
    write_json_atomic,
)
from rockpool.names import check_slug, is_slug, is_version_id, split_image_ref

log = logging.getLogger("rockpool.store")

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
INPUT_INDEX = ".inputs"


def default_root() -> Path:
    override = os.environ.get("ROCKPOOL_HOME")
    if override is not None:
        if not override.strip() or not os.path.isabs(override):
            raise InvalidInput(
                f"ROCKPOOL_HOME must be an absolute path, not '{override}'",
                hint="unset it to use the default store, or set it to e.g. /var/lib/rockpool",
            )
        return Path(override)
    data_home = os.environ.get("XDG_DATA_HOME")
    if data_home and os.path.isabs(data_home):
        return Path(data_home) / "rockpool"
    return Path.home() / ".local" / "share" / "rockpool"


@dataclass(frozen=True)
class Version:
    name: str
    id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.id}"

    def output_path(self, fmt: str) -> Path:
        outputs = self.manifest["outputs"]
        if fmt not in outputs:
            raise NotFound(
                f"{self.ref} has no {fmt} output (it has: {', '.join(outputs)})",
                hint=f'add "{fmt}" to image.formats in the spec and build again',
            )
        return self.path / str(outputs[fmt]["file"])


def is_plain_file_name(name: object) -> bool:
    """A name inside one directory: no separator, no NUL, not . or .."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Fields readers rely on, and the shape each must have where present.
_MANIFEST_FIELDS: dict[str, Any] = {
    "created": lambda v: isinstance(v, str),
    "user": lambda v: isinstance(v, str),
    "spec": lambda v: (
        isinstance(v, dict) and all(_is_count(v[k]) for k in ("cpus", "memory") if k in v)
    ),
    "packages": lambda v: isinstance(v, dict) and all(isinstance(p, dict) for p in v.values()),
    "stage_seconds": lambda v: isinstance(v, dict),
    "verification": lambda v: isinstance(v, dict),
}


def _manifest_problem(manifest: object) -> str | None:
    if not isinstance(manifest, dict):
        return f"holds {type(manifest).__name__}, not an object"
    if manifest.get("architecture") not in ("amd64", "arm64"):
        return f"names no architecture rockpool builds ({manifest.get('architecture')!r})"
    if not isinstance(manifest.get("outputs"), dict):
        return "has no outputs"
    for fmt, entry in manifest["outputs"].items():
        if not isinstance(entry, dict) or not is_plain_file_name(entry.get("file")):
            return f"outputs.{fmt} names no file of the version's own"
        if not all(_is_count(entry[k]) for k in ("size", "allocated") if k in entry):
            return f"outputs.{fmt} has sizes that are no byte counts"
    for key, valid in _MANIFEST_FIELDS.items():
        if key in manifest and not valid(manifest[key]):
            return f"has a {key} rockpool did not write"
    return None


def check_manifest(path: Path, manifest: object) -> dict[str, Any]:
    """The manifest as rockpool wrote it, or Damaged naming the file and the fix."""
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise Damaged(
            f"the manifest {path} {problem}",
            hint=f"remove the damaged version: rockpool image rm "
            f"{path.parent.parent.name}:{path.parent.name}",
        )
    assert isinstance(manifest, dict)
    return manifest


class _Held(threading.local):
    """The store-lock modes this thread holds, by store root: (mode, depth). Per thread:
    each thread's flock is its own open file, as another process's would be."""

    def __init__(self) -> None:
        self.locks: dict[Path, tuple[str, int]] = {}


_HELD = _Held()


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.images_dir = root / "images"
        self.staging_dir = root / "staging"

    # ---- the store's lock ---------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[None]:
        """The store's lock, shared (adding references) or exclusive (deleting them).

        Re-entrant within a process; an exclusive holder may also take it shared.
        """
        mode = "exclusive" if exclusive else "shared"
        key = self.root.absolute()
        held = _HELD.locks.get(key)
        if held is not None:
            if exclusive and held[0] == "shared":
                raise RuntimeError("the store lock is held shared; it cannot become exclusive")
            _HELD.locks[key] = (held[0], held[1] + 1)
            try:
                yield
            finally:
                _HELD.locks[key] = held
            return
        self.ensure_root()
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            _HELD.locks[key] = (mode, 1)
            try:
                yield
            finally:
                del _HELD.locks[key]

    def holds_exclusive(self) -> bool:
        held = _HELD.locks.get(self.root.absolute())
        return held is not None and held[0] == "exclusive"

    @classmethod
    def default(cls) -> Store:
        return cls(default_root())

    def ensure_root(self) -> Path:
        """The store's root, made 0700 (docs/security.md)."""
        return private_directory(self.root)

    def _ensure(self) -> None:
        self.ensure_root()
        for directory in (self.images_dir, self.staging_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # ---- staging ------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A private build directory, removed whatever happens to the build.

        If the process dies before it can clean up, the lock it held is released by the
        kernel and the next build removes the directory.
        """
        self._ensure()
        self.remove_stale_staging()
        build_id = uuid.uuid4().hex[:16]
        lock_path = self.staging_dir / f"{build_id}.lock"
        work = self.staging_dir / build_id
        # Locked before it gets its name, so a concurrent sweep never sees it unlocked.
        unnamed = self.staging_dir / f".{build_id}.lock-new"
        with open(unnamed, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(unnamed, lock_path)
            work.mkdir()
            try:
                yield work
            finally:
                remove_tree(work)
                lock_path.unlink(missing_ok=True)

    def remove_stale_staging(self) -> list[str]:
        removed: list[str] = []
        if not self.staging_dir.is_dir():
            return removed
        for lock_path in sorted(self.staging_dir.glob("*.lock")):
            with open(lock_path, "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live build owns it
                remove_tree(self.staging_dir / lock_path.stem)
                lock_path.unlink(missing_ok=True)
                removed.append(lock_path.stem)
        for orphan in self.staging_dir.iterdir():
            if orphan.is_dir() and not (self.staging_dir / f"{orphan.name}.lock").exists():
                remove_tree(orphan)
                removed.append(orphan.name)
        if removed:
            log.info("removed interrupted builds: %s", ", ".join(removed))
        return removed

    # ---- versions -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _image_lock(self, name: str) -> Iterator[None]:
        directory = self.images_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def land(self, name: str, version_id: str, prepared: Path, manifest: dict[str, Any]) -> Version:
        """Make a fully written directory an immutable version, in one rename."""
        check_slug(name, "image name")
        manifest = {**manifest, "schema": MANIFEST_SCHEMA, "name": name, "version": version_id}
        write_json_atomic(prepared / MANIFEST, manifest)
        for entry in prepared.iterdir():
            if entry.is_file():
                with open(entry, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_directory(prepared)
        with self.locked(exclusive=False), self._image_lock(name):
            target = self.images_dir / name / version_id
            if target.exists():
                # The same bytes again (a reproducible rebuild): it becomes the newest,
                # and verified if this build verified it.
                log.info("version %s:%s exists already; keeping it", name, version_id)
                self._record_verification(target, manifest.get("verification"))
                os.utime(target)
            else:
                os.rename(prepared, target)
                fsync_directory(target.parent)
            if "input_digest" in manifest:
                self._index_input(name, str(manifest["input_digest"]), version_id)
            self._point_latest(name, version_id)
        return self.version(name, version_id)

    @staticmethod
    def _record_verification(target: Path, verification: object) -> None:
        if not isinstance(verification, dict) or not verification.get("verified"):
            return
        stored = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
        if not stored.get("verification", {}).get("verified"):
            write_json_atomic(target / MANIFEST, {**stored, "verification": verification})

    def _index_input(self, name: str, input_digest: str, version_id: str) -> None:
        """Remember which version these inputs gave, beside the version's own manifest:
        other inputs (a lock, a renamed spec) can give the same bytes."""
        index = self.images_dir / name / INPUT_INDEX
        index.mkdir(exist_ok=True)
        tmp = index / f".{input_digest}.{uuid.uuid4().hex}"
        os.symlink(version_id, tmp)
        os.replace(tmp, index / input_digest)

    def repair_latest(self, name: str) -> None:
        """Point latest at the newest version, if a crash stopped it short of that."""
        with self.locked(exclusive=False), self._image_lock(name):
            versions = self.versions(name)
            if versions and self.latest_id(name) != versions[-1].id:
                self._point_latest(name, versions[-1].id)

    def _point_latest(self, name: str, version_id: str) -> None:
        link = self.images_dir / name / "latest"
        tmp = link.with_name(f".latest.{uuid.uuid4().hex}")
        os.symlink(version_id, tmp)
        os.replace(tmp, link)
        fsync_directory(link.parent)

    def remove_version(self, name: str, version_id: str) -> None:
        """Out of view in one rename, then deleted; latest moves to the newest left.

        Works on a version whose manifest is damaged too. The caller holds the store's
        lock exclusive, having checked that no workspace is built on it."""
        assert self.holds_exclusive(), "remove_version needs the store's exclusive lock"
        check_slug(name, "image name")
        if not is_version_id(version_id):
            raise InvalidInput(f"invalid image version '{version_id}'")
        path = self.images_dir / name / version_id
        if path.is_symlink() or not path.is_dir():
            raise NotFound(f"image version {name}:{version_id} does not exist")
        with self._image_lock(name):
            self.staging_dir.mkdir(parents=True, exist_ok=True)
            trash = move_aside(path, self.staging_dir, prefix="removed-")
            link = self.images_dir / name / "latest"
            remaining = self.versions(name)
            if remaining:
                self._point_latest(name, remaining[-1].id)
            else:
                link.unlink(missing_ok=True)
        remove_tree(trash)

    def image_names(self) -> list[str]:
        """Images in the store; a directory that is no image name is not one."""
        if not self.images_dir.is_dir():
            return []
        return sorted(
            p.name
            for p in self.images_dir.iterdir()
            if is_slug(p.name) and p.is_dir() and not p.is_symlink()
        )

    def _version_dirs(self, name: str) -> list[Path]:
        directory = self.images_dir / check_slug(name, "image name")
        if directory.is_symlink() or not directory.is_dir():
            return []
        return [
            entry
            for entry in directory.iterdir()
            if is_version_id(entry.name) and entry.is_dir() and not entry.is_symlink()
        ]

    def versions(self, name: str) -> list[Version]:
        """Versions of one image, oldest first; damaged ones are left out (damaged())."""
        found = []
        for entry in self._version_dirs(name):
            try:
                found.append(self._read(name, entry))
            except (Damaged, NotFound):
                continue
        # Landing order: a version landed again by a reproducible rebuild is the newest.
        return sorted(found, key=lambda v: (v.path.stat().st_mtime, v.id))

    def damaged(self, name: str) -> list[Damaged]:
        """What is wrong with each version of name that cannot be read."""
        problems = []
        for entry in self._version_dirs(name):
            try:
                self._read(name, entry)
            except Damaged as exc:
                problems.append(exc)
            except NotFound:
                continue  # no manifest: a landing under way, or left by a crash
        return problems

    def latest_id(self, name: str) -> str | None:
        link = self.images_dir / check_slug(name, "image name") / "latest"
        try:
            target = os.readlink(link)
        except OSError:
            return None
        # Only a version of this image: never a path elsewhere.
        if not is_version_id(target):
            log.warning("%s points at %r, which is no version; ignoring it", link, target)
            return None
        version_dir = link.parent / target
        if version_dir.is_symlink() or not (version_dir / MANIFEST).is_file():
            return None
        return target

    def version(self, name: str, version_id: str) -> Version:
        check_slug(name, "image name")
        if not is_version_id(version_id):
            raise InvalidInput(f"invalid image version '{version_id}'")
        path = self.images_dir / name / version_id
        if path.is_symlink() or not (path / MANIFEST).is_file():
            raise NotFound(
                f"image version {name}:{version_id} does not exist",
                hint=f"list versions with: rockpool image ls {name}",
            )
        return self._read(name, path)

    def resolve(self, ref: str) -> Version:
        name, version_id = self.resolve_id(ref)
        return self.version(name, version_id)

    def resolve_id(self, ref: str) -> tuple[str, str]:
        """NAME and the version id ref means, without reading the manifest."""
        name, version_id = split_image_ref(ref)
        if version_id == "latest":
            latest = self.latest_id(name)
            if latest is None:
                raise NotFound(
                    f"no image named '{name}' in the store ({self.root})",
                    hint="build it with: rockpool image build",
                )
            version_id = latest
        return name, version_id

    def find_by_input(self, name: str, input_digest: str) -> Version | None:
        try:
            indexed = os.readlink(self.images_dir / name / INPUT_INDEX / input_digest)
        except OSError:
            indexed = None
        if is_version_id(indexed) and (self.images_dir / name / str(indexed) / MANIFEST).is_file():
            try:
                return self.version(name, str(indexed))
            except Damaged:
                return None  # rebuilt, which lands a good version again
        matches = [v for v in self.versions(name) if v.manifest.get("input_digest") == input_digest]
        return matches[-1] if matches else None

    @staticmethod
    def _read(name: str, path: Path) -> Version:
        manifest_path = path / MANIFEST
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFound(f"image version {name}:{path.name} does not exist") from None
        except (OSError, UnicodeError) as exc:
            raise Damaged(
                f"the manifest {manifest_path} cannot be read: {exc}",
                hint=f"remove the damaged version: rockpool image rm {name}:{path.name}",
            ) from None
        try:
            manifest = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise Damaged(
                f"the manifest {manifest_path} is not valid JSON: {exc}",
                hint=f"remove the damaged version: rockpool image rm {name}:{path.name}",
            ) from None
        return Version(
            name=name, id=path.name, path=path, manifest=check_manifest(manifest_path, manifest)
        )
