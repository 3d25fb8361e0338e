"""`mksquashfs` (squashfs-tools): the root tree as the squashfs an Incus system-container
image carries."""

from __future__ import annotations

import os
from pathlib import Path

from rockpool.command import run

# zstd at level 3: a fifth the time of zstd's default level (15) for 13 % more bytes,
# measured on the default image (BENCHMARKS.md); Incus 6.0 unpacks zstd.
COMPRESSION = ("-comp", "zstd", "-Xcompression-level", "3")


def make_squashfs(tree: Path, target: Path, epoch: int) -> None:
    """tree as a squashfs at target, the same bytes for the same tree.

    mksquashfs 4.5 writes reproducibly by default whatever the number of threads: only
    the creation time needs pinning. File times are kept (the build clamped them
    already). POSIX ACLs, which squashfs cannot hold, are left out with a warning.
    """
    run(
        [
            "mksquashfs",
            tree,
            target,
            "-noappend",
            *COMPRESSION,
            "-mkfs-time",
            str(epoch),
            "-processors",
            str(max(1, len(os.sched_getaffinity(0)))),
            "-quiet",
            "-no-progress",
        ]
    )
