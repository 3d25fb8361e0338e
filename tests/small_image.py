"""A small image landed in a store through the real landing code, for tests of the
store and of workspaces that need a version but not a bootable guest: a blank 64 MiB
qcow2 (a VM started from it runs its UEFI firmware, which finds nothing to boot)."""

from __future__ import annotations

import hashlib
import subprocess
import uuid
from pathlib import Path

from rockpool.arch import host_architecture
from rockpool.store import Store, Version

NAME = "small"
MIB = 1 << 20


def land_small_image(store: Store, name: str = NAME) -> Version:
    prepared = store.root / f".prepared-{uuid.uuid4().hex[:8]}"
    prepared.mkdir(parents=True)
    disk = prepared / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    # Each landing is a version of its own, as each build of new inputs is.
    version_id = hashlib.sha256(uuid.uuid4().bytes).hexdigest()[:12]
    manifest = {
        "created": "2026-12-01T00:00:00+00:00",
        "architecture": host_architecture(),
        "user": "coder",
        "spec": {"cpus": 1, "memory": 256 * MIB},
        "outputs": {"qcow2": {"file": "disk.qcow2", "size": disk.stat().st_size}},
        "verification": {"verified": False, "skipped": "a test image"},
    }
    return store.land(name, version_id, prepared, manifest)


def landed_dir(path: Path) -> bool:
    return (path / "manifest.json").is_file()
