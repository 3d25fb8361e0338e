"""Reading files a user names (specs, key files): regular files only, under a size cap,
opened without blocking, so a FIFO, a device or a huge file is an error, not a hang."""

from __future__ import annotations

import os
import stat
from pathlib import Path


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
