"""Removing image versions (image rm, image gc), under the store's exclusive lock: no
workspace create, clone or build landing is half done meanwhile, so every workspace's
backing chain is seen whole and nothing a workspace is built on is ever deleted."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any

from rockpool.errors import Conflict, Damaged
from rockpool.runtime.qemu import Holdings, QemuRuntime
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


def _unreadable(held: Holdings) -> Conflict:
    return Conflict(
        "cannot tell what the disks of these workspaces are built on: "
        + ", ".join(held.unreadable),
        hint="check them with: qemu-img info --backing-chain STORE/workspaces/NAME/disk.qcow2; "
        "remove a broken one with: rockpool workspace rm --force NAME",
    )


def remove_image(store: Store, ref: str) -> str:
    """Remove one version (its manifest may be damaged); refused while a workspace's
    disk is built on it. Returns NAME:VERSION."""
    with store.locked(exclusive=True):
        name, version_id = store.resolve_id(ref)
        try:
            version: Version | None = store.version(name, version_id)
        except Damaged:
            version = None  # removable all the same
        runtime = QemuRuntime(store)
        held = runtime.holdings()
        if held.unreadable:
            raise _unreadable(held)
        users = held.users(store.images_dir / name / version_id)
        if users:
            raise Conflict(
                f"{name}:{version_id} is in use by workspaces: {', '.join(users)}",
                hint="remove those workspaces first; their disks are built on it",
            )
        store.remove_version(name, version_id)
    if version is not None:
        uninstall_from_tart(store, version)
    return f"{name}:{version_id}"


def collect(store: Store) -> Collected:
    """Remove every version that is neither its image's latest nor held by a workspace,
    layers no workspace uses, and what interrupted operations left."""
    result = Collected()
    removed_versions: list[Version] = []
    with store.locked(exclusive=True):
        runtime = QemuRuntime(store)
        result.warnings += [str(problem) for problem in runtime.damaged()]
        held = runtime.holdings()
        if held.unreadable:
            result.warnings.append(str(_unreadable(held)) + "; nothing was removed")
            return result
        for name in store.image_names():
            result.warnings += [f"skipped: {problem}" for problem in store.damaged(name)]
            latest = store.latest_id(name)
            versions = store.versions(name)
            if versions and latest not in {v.id for v in versions}:
                latest = versions[-1].id  # latest is damaged: keep the newest usable one
            for version in versions:
                users = held.users(version.path)
                if version.id == latest or users:
                    result.kept.append(
                        {"image": version.ref, "latest": version.id == latest, "held_by": users}
                    )
                    continue
                store.remove_version(name, version.id)
                removed_versions.append(version)
                result.removed.append(version.ref)
        result.removed_layers = [str(p) for p in runtime.remove_unused_layers()]
        store.remove_stale_staging()
    for version in removed_versions:
        uninstall_from_tart(store, version)
    return result


def uninstall_from_tart(store: Store, version: Version) -> None:
    """On a Mac, a removed version's installed Tart VM goes too (it is a full copy)."""
    if version.manifest.get("architecture") != "arm64" or shutil.which("tart") is None:
        return
    from rockpool.runtime.tart import TartRuntime

    TartRuntime(store).uninstall_image(version)
