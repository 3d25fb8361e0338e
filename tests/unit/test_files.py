"""The disk digest: reads only data, and is what coreutils compute from the whole file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from rockpool.files import DISK_DIGEST_CHUNK, sha256_chunks


def sparse_file(path: Path, size: int, writes: dict[int, bytes]) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, data in writes.items():
            handle.seek(offset)
            handle.write(data)
    return path


def coreutils_digest(path: Path) -> str:
    """The documented check, run as a user would (files.DISK_DIGEST_COMMAND)."""
    result = subprocess.run(
        f"split -b 4M --filter=sha256sum {path} | sha256sum",
        shell=True,
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.split()[0]


def test_the_disk_digest_is_what_split_and_sha256sum_compute(tmp_path: Path) -> None:
    # Data at the start, across a chunk boundary, and in a last, shorter chunk.
    size = 5 * DISK_DIGEST_CHUNK + 12345
    disk = sparse_file(
        tmp_path / "disk.raw",
        size,
        {0: b"boot", 2 * DISK_DIGEST_CHUNK - 2: b"span", size - 3: b"end"},
    )
    assert os.stat(disk).st_blocks * 512 < size  # really sparse
    assert sha256_chunks(disk) == coreutils_digest(disk)


def test_an_empty_file_and_a_file_of_holes_match_coreutils(tmp_path: Path) -> None:
    empty = sparse_file(tmp_path / "empty", 0, {})
    holes = sparse_file(tmp_path / "holes", 3 * DISK_DIGEST_CHUNK, {})
    assert sha256_chunks(empty) == coreutils_digest(empty)
    assert sha256_chunks(holes) == coreutils_digest(holes)


def test_the_disk_digest_sees_data_and_size_not_where_holes_are(tmp_path: Path) -> None:
    a = sparse_file(tmp_path / "a", 64 << 20, {32 << 20: b"data"})
    # The same bytes, with the zeros written out instead of left as holes.
    b = sparse_file(tmp_path / "b", 64 << 20, {32 << 20: b"data", 0: bytes(8 << 20)})
    assert os.stat(b).st_blocks > os.stat(a).st_blocks
    assert sha256_chunks(a) == sha256_chunks(b)
    with open(b, "r+b") as handle:
        handle.seek(32 << 20)
        handle.write(b"DATA")
    assert sha256_chunks(a) != sha256_chunks(b)
    c = sparse_file(tmp_path / "c", 65 << 20, {32 << 20: b"data"})
    assert sha256_chunks(a) != sha256_chunks(c)
