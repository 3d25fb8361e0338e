"""The root filesystem tree between stages: tarball snapshots for the stage cache, and
the listing of every file that `rockpool image diff` compares."""

from __future__ import annotations

import gzip
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rockpool.command import run
from rockpool.files import sha256_file

LISTING = "rootfs.json.gz"
_TAR_OPTIONS = ("--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls")


def snapshot(root: Path, tarball: Path, members: Sequence[str] = (".",)) -> None:
    """The tree (or members of it) in one tarball: owners, modes, hard links, xattrs
    (file capabilities), device nodes, in name order."""
    run(
        [
            "tar",
            "--create",
            "--file",
            tarball,
            "--directory",
            root,
            "--sort=name",
            "--format=posix",
            "--sparse",
            *_TAR_OPTIONS,
            "--",
            *members,
        ]
    )


def restore(tarball: Path, root: Path) -> None:
    root.mkdir(exist_ok=True)
    run(
        [
            "tar",
            "--extract",
            "--file",
            tarball,
            "--directory",
            root,
            "--same-permissions",
            "--same-owner",
            *_TAR_OPTIONS,
        ]
    )


def _describe(path: str, info: os.stat_result) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "mode": f"{stat.S_IMODE(info.st_mode):04o}",
        "uid": info.st_uid,
        "gid": info.st_gid,
        "mtime": int(info.st_mtime),
    }
    if stat.S_ISREG(info.st_mode):
        entry.update(type="file", size=info.st_size, sha256=sha256_file(path))
    elif stat.S_ISDIR(info.st_mode):
        entry["type"] = "dir"
    elif stat.S_ISLNK(info.st_mode):
        entry.update(type="symlink", target=os.readlink(path))
    elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        kind = "char" if stat.S_ISCHR(info.st_mode) else "block"
        entry.update(type=kind, rdev=f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}")
    else:
        entry["type"] = "fifo" if stat.S_ISFIFO(info.st_mode) else "socket"
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:
        names = []
    if names:
        entry["xattrs"] = {
            name: os.getxattr(path, name, follow_symlinks=False).hex() for name in names
        }
    return entry


def listing(root: Path) -> dict[str, dict[str, Any]]:
    """Every path below root (as "/etc/fstab"), with its type, owner, mode, mtime,
    xattrs and, for files, size and sha256."""
    found: dict[str, dict[str, Any]] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in (*subdirs, *sorted(files)):
            path = os.path.join(directory, name)
            found["/" + os.path.relpath(path, root)] = _describe(path, os.lstat(path))
    return dict(sorted(found.items()))


def write_listing(root: Path, target: Path) -> None:
    # mtime=0 keeps the gzip header free of the build's time.
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(json.dumps(listing(root), separators=(",", ":")).encode())


def read_listing(path: Path) -> dict[str, dict[str, Any]]:
    with gzip.open(path, "rb") as handle:
        data: dict[str, dict[str, Any]] = json.loads(handle.read())
    return data
