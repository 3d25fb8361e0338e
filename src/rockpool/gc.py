"""Removing image versions (image rm, image gc), under the store's exclusive lock: no
workspace create, clone or build landing is half done meanwhile, so every workspace's
backing chain is seen whole and nothing a workspace is built on is ever deleted.

Every runtime this host can run is asked, through the registry: what its workspaces
hold (Runtime.holdings), what of its own it can delete (remove_unused), and, once a
version is gone and the lock released, to uninstall it (Tart's image VM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rockpool import runtime as runtimes
from rockpool.errors import Conflict, Damaged
from rockpool.runtime.base import Holdings, Runtime
from rockpool.store import Store, Version


@dataclass
class Collected:
    removed: list[str] = field(default_factory=list)
    kept: list[dict[str, Any]] = field(default_factory=list)
    removed_layers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": self.removed,
            "kept": self.kept,
            "removed_layers": self.removed_layers,
            "warnings": self.warnings,
        }


def _users(held: list[Holdings], directory: Path) -> list[str]:
    return sorted({name for holdings in held for name in holdings.users(directory)})


def remove_image(store: Store, ref: str) -> str:
    """Remove one version (its manifest may be damaged); refused while a workspace of
    any runtime holds it. Returns NAME:VERSION."""
    with store.locked(exclusive=True):
        name, version_id = store.resolve_id(ref)
        try:
            version: Version | None = store.version(name, version_id)
        except Damaged:
            version = None  # removable all the same
        present = runtimes.available(store)
        held = [runtime.holdings() for runtime in present]
        for holdings in held:
            if problem := holdings.problem():
                raise problem
        users = _users(held, store.images_dir / name / version_id)
        if users:
            raise Conflict(
                f"{name}:{version_id} is in use by workspaces: {', '.join(users)}",
                hint="remove those workspaces first; their disks are built on it",
            )
        store.remove_version(name, version_id)
    if version is not None:
        _uninstall(present, [version])
    return f"{name}:{version_id}"


def collect(store: Store) -> Collected:
    """Remove every version that is neither its image's latest nor held by a workspace,
    what runtimes keep that no workspace uses (QEMU's layers), and what interrupted
    operations left."""
    result = Collected()
    removed_versions: list[Version] = []
    with store.locked(exclusive=True):
        present = runtimes.available(store)
        for runtime in present:
            result.warnings += [str(problem) for problem in runtime.damaged()]
        held = [runtime.holdings() for runtime in present]
        problems = [problem for holdings in held if (problem := holdings.problem())]
        if problems:
            result.warnings += [f"{problem}; nothing was removed" for problem in problems]
            return result
        for name in store.image_names():
            result.warnings += [f"skipped: {problem}" for problem in store.damaged(name)]
            latest = store.latest_id(name)
            versions = store.versions(name)
            if versions and latest not in {v.id for v in versions}:
                latest = versions[-1].id  # latest is damaged: keep the newest usable one
            for version in versions:
                users = _users(held, version.path)
                if version.id == latest or users:
                    result.kept.append(
                        {"image": version.ref, "latest": version.id == latest, "held_by": users}
                    )
                    continue
                store.remove_version(name, version.id)
                removed_versions.append(version)
                result.removed.append(version.ref)
        for runtime in present:
            result.removed_layers += [str(path) for path in runtime.remove_unused()]
        store.remove_stale_staging()
    _uninstall(present, removed_versions)
    return result


def _uninstall(present: list[Runtime], versions: list[Version]) -> None:
    """What runtimes installed of removed versions goes too (Tart's VM is a full copy)."""
    for version in versions:
        for runtime in present:
            runtime.uninstall_image(version)
