"""An independent check of Apple-framed LZ4 streams: re-wrap every block as a standard
LZ4 frame and let the Debian lz4 tool (its own liblz4, not python-lz4) decode it."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from rockpool.formats import tart_oci

_FRAME_MAGIC = 0x184D2204
_PRIME1, _PRIME2, _PRIME3, _PRIME4, _PRIME5 = (
    2654435761,
    2246822519,
    3266489917,
    668265263,
    374761393,
)
_MASK = 0xFFFFFFFF


def _rotl(value: int, bits: int) -> int:
    return ((value << bits) | (value >> (32 - bits))) & _MASK


def xxh32(data: bytes, seed: int = 0) -> int:
    """xxHash32 for short inputs (< 16 bytes), enough for an LZ4 frame descriptor."""
    assert len(data) < 16
    acc = (seed + _PRIME5 + len(data)) & _MASK
    index = 0
    while index + 4 <= len(data):
        (lane,) = struct.unpack_from("<I", data, index)
        acc = _rotl((acc + lane * _PRIME3) & _MASK, 17) * _PRIME4 & _MASK
        index += 4
    for byte in data[index:]:
        acc = _rotl((acc + byte * _PRIME5) & _MASK, 11) * _PRIME1 & _MASK
    acc ^= acc >> 15
    acc = acc * _PRIME2 & _MASK
    acc ^= acc >> 13
    acc = acc * _PRIME3 & _MASK
    acc ^= acc >> 16
    return acc


def _frame_header() -> bytes:
    descriptor = bytes([0b0110_0000, 0x70])  # version 1, independent blocks; 4 MiB max
    return struct.pack("<I", _FRAME_MAGIC) + descriptor + bytes([(xxh32(descriptor) >> 8) & 0xFF])


def apple_blocks_as_lz4_frame(stream: BinaryIO) -> Iterator[bytes]:
    """Yield a standard LZ4 frame carrying the same blocks; raises on any framing error."""
    yield _frame_header()
    while True:
        magic = stream.read(4)
        if magic == b"bv4$":
            if stream.read(1):
                raise ValueError("bytes after the end-of-stream marker")
            break
        if magic != b"bv41":
            raise ValueError(f"bad block magic {magic!r}")
        decoded, encoded = struct.unpack("<II", stream.read(8))
        if decoded > 4 << 20:
            raise ValueError(f"block of {decoded} bytes exceeds 4 MiB")
        payload = stream.read(encoded)
        if len(payload) != encoded:
            raise ValueError("truncated block")
        yield struct.pack("<I", encoded) + payload
    yield struct.pack("<I", 0)  # end mark


def decode_digest(blob: Path) -> tuple[int, str]:
    """(size, sha256) of what the Apple-framed LZ4 blob decodes to, via the lz4 tool."""
    proc = subprocess.Popen(["lz4", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    digest = hashlib.sha256()
    size = 0

    def feed() -> None:
        assert proc.stdin is not None
        with open(blob, "rb") as source:
            for piece in apple_blocks_as_lz4_frame(source):
                proc.stdin.write(piece)
        proc.stdin.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    while chunk := proc.stdout.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    feeder.join()
    if proc.wait() != 0:
        raise ValueError(f"lz4 could not decode {blob}")
    return size, digest.hexdigest()


def check_disk_layers(
    layers: Sequence[dict[str, Any]], blob_path: Callable[[str], Path], disk: Path
) -> str:
    """Decode every Tart disk layer with the lz4 tool; its annotations must name what it
    decodes to, and that must be the disk's bytes at its offset. Returns the digest of
    all of them together as the manifest records a disk's, computed here as
    `split -b 4M --filter=sha256sum | sha256sum` does (docs/cli.md, "Disk digests")."""
    whole = hashlib.sha256()
    piece, pending = 4 << 20, b""
    with open(disk, "rb") as raw:
        for layer in layers:
            size, digest = decode_digest(blob_path(layer["digest"]))
            annotations = layer["annotations"]
            assert int(annotations[tart_oci.UNCOMPRESSED_SIZE]) == size
            assert annotations[tart_oci.UNCOMPRESSED_DIGEST] == f"sha256:{digest}"
            chunk = raw.read(size)
            assert hashlib.sha256(chunk).hexdigest() == digest
            data = memoryview(pending + chunk)
            full = len(data) - len(data) % piece
            for start in range(0, full, piece):
                line = f"{hashlib.sha256(data[start : start + piece]).hexdigest()}  -\n"
                whole.update(line.encode())
            pending = bytes(data[full:])
    if pending:
        whole.update(f"{hashlib.sha256(pending).hexdigest()}  -\n".encode())
    return whole.hexdigest()
