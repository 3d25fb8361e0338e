"""File operations every layer shares, each in one place: reading files a user names
(regular files only, under a size cap, opened without blocking, so a FIFO, a device or a
huge file is an error, not a hang), private and atomic writes, hashing, hard links with
a copy as fallback, and removal that takes a tree out of view in one rename first."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from rockpool.command import run
from rockpool.errors import Conflict

log = logging.getLogger("rockpool.files")

_HASH_CHUNK = 8 << 20


class NotRegularFile(ValueError):
    pass


class TooLarge(ValueError):
    pass


def read_regular(path: Path | str, limit: int) -> bytes:
    """The bytes of a regular file of at most limit bytes; FileNotFoundError, OSError,
    NotRegularFile or TooLarge otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise TooLarge(f"{path} is larger than {limit} bytes")
    return b"".join(chunks)


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# A disk is digested in chunks of this size: `split -b 4M --filter=sha256sum` cuts the same.
DISK_DIGEST_CHUNK = 4 << 20
# How a user checks a disk digest with coreutils alone (docs/cli.md).
DISK_DIGEST_COMMAND = "split -b 4M --filter=sha256sum FILE | sha256sum"


@functools.cache
def _zero_chunk_line(length: int) -> bytes:
    return f"{hashlib.sha256(bytes(length)).hexdigest()}  -\n".encode()


def _data_chunks(fd: int, size: int) -> set[int]:
    """Indexes of the chunks that hold any data (not only holes)."""
    chunks: set[int] = set()
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        chunks.update(range(start // DISK_DIGEST_CHUNK, (end - 1) // DISK_DIGEST_CHUNK + 1))
        offset = end
    return chunks


def sha256_chunks(path: Path | str) -> str:
    """The digest of a (sparse) disk that reads only its allocated extents.

    sha256 over the `sha256sum` line ("HEX  -") of each 4 MiB chunk, so that
    DISK_DIGEST_COMMAND gives the same. A chunk without data is known to be zeros and is
    not read; where the filesystem put holes does not change the digest. The chunks
    with data are hashed on every core (hashlib and pread release the GIL).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        count = (size + DISK_DIGEST_CHUNK - 1) // DISK_DIGEST_CHUNK
        data = sorted(_data_chunks(fd, size))

        def line(index: int) -> bytes:
            chunk = os.pread(fd, DISK_DIGEST_CHUNK, index * DISK_DIGEST_CHUNK)
            return f"{hashlib.sha256(chunk).hexdigest()}  -\n".encode()

        with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
            lines = dict(zip(data, pool.map(line, data), strict=True))
    finally:
        os.close(fd)
    digest = hashlib.sha256()
    for index in range(count):
        length = min(DISK_DIGEST_CHUNK, size - index * DISK_DIGEST_CHUNK)
        digest.update(lines.get(index) or _zero_chunk_line(length))
    return digest.hexdigest()


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PRIVATE_FILE = 0o600
PRIVATE_DIRECTORY = 0o700


def open_private(path: Path, mode: str = "w") -> IO[Any]:
    """Open path for writing ("w", "a", "wb", "ab"), creating it 0600: readable by the
    store's owner alone from its first byte."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    flags |= os.O_APPEND if "a" in mode else os.O_TRUNC
    fd = os.open(path, flags, PRIVATE_FILE)
    return os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8")


def write_whole(path: Path, text: str, *, replace: bool) -> None:
    """path's content as text, whole or not at all (a temporary file, then one link or
    rename). Without replace, FileExistsError if path exists, also if it was made
    meanwhile: unlike a rename, a link never replaces a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_private(path: Path, text: str) -> None:
    """path's content replaced by text, atomically and durably, in a 0600 file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open_private(tmp) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def copy_private(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open_private(target, "wb") as dst:
        shutil.copyfileobj(src, dst)


def private_directory(path: Path) -> Path:
    """mkdir -p path, the last component 0700. A directory left looser by an older
    rockpool is tightened, for what is below it may be secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=PRIVATE_DIRECTORY)
    info = path.stat()
    if info.st_mode & 0o077 and info.st_uid == os.geteuid():
        log.warning("%s was readable by others; making it private (0700)", path)
        path.chmod(PRIVATE_DIRECTORY)
    return path


def image_directory(path: Path, mode: int = 0o755) -> None:
    """mkdir -p for a directory of an image: each one made gets mode itself, not mode
    masked by the builder's umask, which must not reach the image's bytes."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(mode)


def write_json_atomic(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    write_private(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            points = [line.split()[4] for line in handle]
    except FileNotFoundError:  # macOS: no /proc, and the Packer path mounts nothing
        return []
    return [p for p in points if p.startswith(prefix)]


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where source and target share a filesystem (final files are never
    written again, so sharing costs nothing); else a sparse copy, a plain one on macOS
    (BSD cp has no --sparse)."""
    try:
        os.link(source, target)
    except OSError:
        if sys.platform == "darwin":
            shutil.copyfile(source, target)
        else:
            run(["cp", "--sparse=always", "--reflink=auto", source, target])


def link_tree(source: Path, target: Path) -> None:
    """Hard-link a file, or every file below a directory, to target (same filesystem)."""
    if source.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
        return
    for member in sorted(source.rglob("*")):
        destination = target / member.relative_to(source)
        if member.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.link(member, destination)


def move_aside(path: Path, into: Path | None = None, *, prefix: str = ".removed-") -> Path | None:
    """Take path out of view in one rename, to a unique name in into (default: beside
    it); the caller deletes it with remove_tree, usually after releasing its locks.
    None when path is gone already."""
    trash = (into or path.parent) / f"{prefix}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return None
    return trash


def remove_tree(path: Path | None) -> None:
    """Delete a tree, never through a mount below it (it could be the host's /dev)."""
    if path is None or not path.exists():
        return
    mounts = _mounts_below(path)
    if mounts:
        raise Conflict(
            f"refusing to remove {path}: something is mounted below it ({mounts[0]})",
            hint="unmount it (umount -R PATH) and run the command again",
        )
    shutil.rmtree(path, ignore_errors=True)  # a concurrent sweep may remove parts too
    if path.exists():
        raise Conflict(f"could not remove {path}", hint="check its permissions, then retry")
