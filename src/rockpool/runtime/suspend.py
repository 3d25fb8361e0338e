"""A suspended workspace's saved state, and whether a start may resume from it.

    NAME/suspend/state.bin    QEMU's migration stream: the guest's RAM and devices (0600)
    NAME/suspend/saved.json   what the state was saved against; written last
    NAME/suspend/.partial     a state being written

saved.json is the commit point: a state without it was never finished (the suspend was
interrupted) and is never used. A state is used once: the start that reads it, or finds
it stale, deletes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rockpool.files import (
    PRIVATE_FILE,
    private_directory,
    remove_tree,
    sha256_file,
    write_json_atomic,
)

DIRECTORY = "suspend"
STATE = "state.bin"
SAVED = "saved.json"
PARTIAL = ".partial"


def directory(workspace: Path) -> Path:
    return workspace / DIRECTORY


def partial(workspace: Path) -> Path:
    """Where a suspend writes the state; the directory is made private first."""
    return private_directory(directory(workspace)) / PARTIAL


def is_suspended(workspace: Path) -> bool:
    return (directory(workspace) / SAVED).is_file()


def interrupted(workspace: Path) -> bool:
    """A suspend began here and did not finish."""
    return (directory(workspace) / PARTIAL).exists() and not is_suspended(workspace)


def discard(workspace: Path) -> None:
    remove_tree(directory(workspace))


def file_identity(path: Path) -> dict[str, int] | None:
    """What changes whenever a file is written, replaced or resized."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return {
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
        "inode": info.st_ino,
    }


def boot_inputs(variables: Mapping[str, str], keys: str | None) -> str:
    """One digest of what a start gives the guest through the config disk: the init
    contract reads it once, at boot, so a resumed guest has the values it booted with."""
    text = json.dumps({"env": dict(sorted(variables.items())), "keys": keys or ""})
    return hashlib.sha256(text.encode()).hexdigest()


def commit(
    workspace: Path,
    machine: dict[str, Any],
    disks: Mapping[str, Path],
    boot: str | None,
    image: str,
) -> Path:
    """Make the finished partial state the workspace's saved state."""
    state = directory(workspace) / STATE
    os.chmod(directory(workspace) / PARTIAL, PRIVATE_FILE)  # it holds the guest's RAM
    os.replace(directory(workspace) / PARTIAL, state)
    saved = {
        "machine": machine,
        "disks": {name: file_identity(path) for name, path in disks.items()},
        "boot_inputs": boot,
        "image": image,
        "state": {"size": state.stat().st_size, "sha256": sha256_file(state)},
    }
    write_json_atomic(directory(workspace) / SAVED, saved)
    return state


def refresh_disk(workspace: Path, name: str, path: Path) -> None:
    """The disk file was replaced by one with the same content (a clone's new top
    layer over its frozen old one): the saved state still fits it."""
    saved_file = directory(workspace) / SAVED
    saved = json.loads(saved_file.read_text())
    saved["disks"][name] = file_identity(path)
    write_json_atomic(saved_file, saved)


def stale_reason(
    workspace: Path, machine: dict[str, Any], disks: Mapping[str, Path], boot: str | None
) -> str | None:
    """Why the saved state cannot be trusted for this start, or None if it can."""
    try:
        saved = json.loads((directory(workspace) / SAVED).read_text())
        saved_machine = saved["machine"]
        saved_disks = saved["disks"]
        expected = saved["state"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the saved state's record is damaged"
    if saved_machine.get("qemu") != machine["qemu"]:
        return f"the QEMU binary changed since the suspend ({machine['qemu']['path']})"
    if saved_machine.get("firmware_sha256") != machine["firmware_sha256"]:
        return "the UEFI firmware changed since the suspend"
    if saved_machine.get("machine") != machine["machine"]:
        changed = sorted(set(machine["machine"]) ^ set(saved_machine.get("machine", [])))
        return "the VM's machine changed since the suspend: " + " ".join(changed)[:200]
    for name, path in disks.items():
        if saved_disks.get(name) != file_identity(path):
            return f"{name} was changed since the suspend"
    if saved.get("boot_inputs") != boot:
        return (
            "this start gives other ROCKPOOL_* values or SSH keys than the suspended boot "
            "had (the guest reads them once, at boot)"
        )
    state = directory(workspace) / STATE
    try:
        size = state.stat().st_size
    except FileNotFoundError:
        return "the state file is missing"
    if size != expected.get("size") or sha256_file(state) != expected.get("sha256"):
        return "the state file is incomplete or damaged"
    return None
