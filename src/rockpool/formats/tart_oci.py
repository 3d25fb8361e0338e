"""tart-oci: the image as Tart pushes it to a registry, in an OCI image-layout directory.

Layers, in Tart's order:
    1   Tart's config.json
    N   disk v2: the raw disk in 512 MiB chunks, each Apple-LZ4 compressed on its own
    1   nvram.bin: left out of the build, because only macOS can create one. `tart pull`
        insists on it, so `rockpool image push` adds it to a copy of the layout
        (with_nvram) from `tart create --linux` on macOS, or from --nvram elsewhere.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rockpool.files import link_or_copy
from rockpool.formats import apple_lz4
from rockpool.formats.base import FormatJob, Output, OutputFormat
from rockpool.formats.tart import config_bytes

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
TART_CONFIG_TYPE = "application/vnd.cirruslabs.tart.config.v1"
TART_DISK_TYPE = "application/vnd.cirruslabs.tart.disk.v2"
TART_NVRAM_TYPE = "application/vnd.cirruslabs.tart.nvram.v1"
UNCOMPRESSED_SIZE = "org.cirruslabs.tart.uncompressed-size"
UNCOMPRESSED_DIGEST = "org.cirruslabs.tart.uncompressed-content-digest"
UNCOMPRESSED_DISK_SIZE = "org.cirruslabs.tart.uncompressed-disk-size"
UPLOAD_TIME = "org.cirruslabs.tart.upload-time"
DISK_FORMAT_LABEL = "org.cirruslabs.tart.disk.format"
CHUNK_SIZE = 512 << 20
_READ_SIZE = 8 << 20


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    digest: str  # sha256:HEX
    size: int

    def descriptor(self, media_type: str, **annotations: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"mediaType": media_type, "digest": self.digest, "size": self.size}
        if annotations:
            entry["annotations"] = annotations
        return entry


class Layout:
    """An OCI image-layout directory whose blobs are written atomically by digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.blobs.mkdir(parents=True)

    def add_bytes(self, data: bytes) -> Blob:
        digest = hashlib.sha256(data).hexdigest()
        target = self.blobs / digest
        if not target.exists():
            self._commit(data, target)
        return Blob(f"sha256:{digest}", len(data))

    def _commit(self, data: bytes, target: Path) -> None:
        tmp = target.with_name(f".{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def link_blob(self, source: Path) -> None:
        target = self.blobs / source.name
        if not target.exists():
            link_or_copy(source, target)

    def finish(self, manifest: Blob) -> None:
        (self.root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
        index = {
            "schemaVersion": 2,
            "mediaType": INDEX_TYPE,
            "manifests": [manifest.descriptor(MANIFEST_TYPE)],
        }
        (self.root / "index.json").write_bytes(canonical_json(index))


def _chunk_is_hole(fd: int, offset: int, length: int) -> bool:
    """True when the sparse disk holds no data in [offset, offset+length)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError:  # ENXIO: no data from offset to the end of the file
        return True


@dataclass(frozen=True)
class DiskLayer:
    compressed: bytes
    uncompressed_size: int
    uncompressed_digest: str


def _layer(data: bytes | memoryview) -> DiskLayer:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return DiskLayer(apple_lz4.compress(data), len(data), digest)


def _read_chunk(raw_disk: Path, offset: int, length: int) -> DiskLayer:
    data = bytearray(length)
    view = memoryview(data)
    with open(raw_disk, "rb") as disk:
        disk.seek(offset)
        filled = 0
        while filled < length:
            read = disk.readinto(view[filled : filled + _READ_SIZE])
            if not read:
                raise OSError(f"{raw_disk} ended early at byte {offset + filled}")
            filled += read
    return _layer(view)


def disk_layers(raw_disk: Path, on_layer: Callable[[int], None]) -> Iterator[DiskLayer]:
    """The disk's chunks as Tart's disk v2 layers, in order.

    Chunks run on several threads (lz4 and sha256 release the GIL) with a bounded
    window so memory stays at a few chunks. A chunk that is a hole in the sparse disk
    is all zeros; its layer is computed once and reused.
    """
    size = raw_disk.stat().st_size
    chunks = [(offset, min(CHUNK_SIZE, size - offset)) for offset in range(0, size, CHUNK_SIZE)]
    workers = max(1, min(4, os.cpu_count() or 1))
    zero_layers: dict[int, Future[DiskLayer]] = {}
    window: collections.deque[Future[DiskLayer]] = collections.deque()
    with open(raw_disk, "rb") as disk, ThreadPoolExecutor(max_workers=workers) as pool:
        for index, (offset, length) in enumerate(chunks):
            if _chunk_is_hole(disk.fileno(), offset, length):
                if length not in zero_layers:
                    zero_layers[length] = pool.submit(_layer, bytes(length))
                window.append(zero_layers[length])
            else:
                window.append(pool.submit(_read_chunk, raw_disk, offset, length))
            if len(window) > workers:
                yield window.popleft().result()
                on_layer(index + 1 - len(window))
        while window:
            yield window.popleft().result()
            on_layer(len(chunks) - len(window))


class TartOciFormat(OutputFormat):
    name = "tart-oci"
    filename = "tart-oci"
    architectures = ("arm64",)

    def write(self, job: FormatJob) -> Output:
        layout = Layout(job.out_dir / self.filename)
        disk_size = job.raw_disk.stat().st_size
        task = job.reporter.task(
            "tart-oci: compressing disk chunks", total=-(-disk_size // CHUNK_SIZE)
        )
        layers = [layout.add_bytes(config_bytes(job)).descriptor(TART_CONFIG_TYPE)]
        for layer in disk_layers(job.raw_disk, task.update):
            blob = layout.add_bytes(layer.compressed)
            annotations = {
                UNCOMPRESSED_SIZE: str(layer.uncompressed_size),
                UNCOMPRESSED_DIGEST: layer.uncompressed_digest,
            }
            layers.append(blob.descriptor(TART_DISK_TYPE, **annotations))
        task.done()
        image_config = {
            "architecture": job.architecture,
            "os": "linux",
            "config": {"Labels": {DISK_FORMAT_LABEL: "raw"}},
        }
        # Tart stamps the push time; the build's SOURCE_DATE_EPOCH keeps rebuilds identical.
        stamp = dt.datetime.fromtimestamp(job.source_date_epoch, dt.UTC)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": layout.add_bytes(canonical_json(image_config)).descriptor(OCI_CONFIG_TYPE),
            "layers": layers,
            "annotations": {
                UNCOMPRESSED_DISK_SIZE: str(disk_size),
                UPLOAD_TIME: stamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
        layout.finish(layout.add_bytes(canonical_json(manifest)))
        return Output(self.name, layout.root)


def read_manifest(layout: Path) -> tuple[dict[str, Any], Path]:
    """The single manifest of a layout, and its blob's path."""
    index = json.loads((layout / "index.json").read_text(encoding="utf-8"))
    (entry,) = index["manifests"]
    path = layout / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")
    return json.loads(path.read_text(encoding="utf-8")), path


def with_nvram(layout: Path, nvram: bytes, target: Path) -> Path:
    """A copy of a layout (blobs hard-linked) with Tart's nvram layer appended."""
    manifest, _ = read_manifest(layout)
    if any(layer["mediaType"] == TART_NVRAM_TYPE for layer in manifest["layers"]):
        return layout
    copy = Layout(target)
    for blob in sorted((layout / "blobs" / "sha256").iterdir()):
        copy.link_blob(blob)
    nvram_layer = copy.add_bytes(nvram).descriptor(TART_NVRAM_TYPE)
    manifest = {**manifest, "layers": [*manifest["layers"], nvram_layer]}
    copy.finish(copy.add_bytes(canonical_json(manifest)))
    return target
