"""Apple's LZ4 framing (Compression framework, COMPRESSION_LZ4), which Tart's disk layers use.

The stream is a run of blocks, each a header plus one raw LZ4 block, then an end marker:
    b"bv41" + u32le decoded size + u32le encoded size + LZ4 block
    b"bv4$"
This is not the LZ4 frame format (magic 0x184D2204) that the lz4 tools write.
"""

from __future__ import annotations

import struct

import lz4.block

COMPRESSED_BLOCK = b"bv41"
END_OF_STREAM = b"bv4$"
# Each block is compressed on its own; LZ4's 64 KiB window makes larger blocks gain
# next to nothing, and small blocks keep every decoder's buffers small.
BLOCK_SIZE = 64 << 10


def compress(data: bytes | memoryview) -> bytes:
    view = memoryview(data)
    parts: list[bytes] = []
    for offset in range(0, len(view), BLOCK_SIZE):
        block = view[offset : offset + BLOCK_SIZE]
        encoded = lz4.block.compress(block, store_size=False)
        parts.append(COMPRESSED_BLOCK + struct.pack("<II", len(block), len(encoded)) + encoded)
    parts.append(END_OF_STREAM)
    return b"".join(parts)
