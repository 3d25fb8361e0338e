"""The Tart bundle and the Tart OCI layout, written from a small synthetic sparse disk."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from rockpool.build.outputs import output_digest
from rockpool.formats import apple_lz4, output_format, tart_oci
from rockpool.spec import ImageSpec, load_spec
from tests.contexts import format_job
from tests.lz4_frames import check_disk_layers, decode_digest, xxh32
from tests.unit.test_files import coreutils_digest

REPO = Path(__file__).resolve().parents[2]
CHUNK = 1 << 20  # the real 512 MiB chunks are exercised on the built arm64 image


@pytest.fixture
def spec() -> ImageSpec:
    return load_spec(REPO / "images" / "workspace-arm64.toml")


@pytest.fixture
def sparse_disk(tmp_path: Path) -> Path:
    """3.5 chunks: data, a hole, data at the start of a chunk, then a short hole."""
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate(3 * CHUNK + CHUNK // 2)
        handle.seek(100)
        handle.write(os.urandom(300_000) + b"workspace" * 10_000)
        handle.seek(2 * CHUNK)
        handle.write(os.urandom(4096))
    return disk


def test_xxh32_matches_the_reference_vectors() -> None:
    assert xxh32(b"") == 0x02CC5D05
    assert xxh32(b"a") == 0x550D7456
    assert xxh32(b"abc") == 0x32D153FF


def test_apple_lz4_blocks_decode_with_the_lz4_tool(tmp_path: Path) -> None:
    data = os.urandom(200_000) + bytes(3_000_000) + b"tart" * 50_000
    blob = tmp_path / "blob"
    blob.write_bytes(apple_lz4.compress(data))
    assert blob.read_bytes()[:4] == b"bv41" and blob.read_bytes()[-4:] == b"bv4$"
    assert decode_digest(blob) == (len(data), hashlib.sha256(data).hexdigest())


def test_tart_bundle_has_tarts_config_and_the_raw_disk(
    spec: ImageSpec, sparse_disk: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    bundle = output_format("tart").write(format_job(spec, sparse_disk, out)).path
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "disk.img"]
    config = json.loads((bundle / "config.json").read_text())
    assert config["version"] == 1 and config["os"] == "linux" and config["arch"] == "arm64"
    assert config["cpuCount"] == config["cpuCountMin"] == spec.cpus
    assert config["memorySize"] == config["memorySizeMin"] == spec.memory
    assert config["diskFormat"] == "raw"
    first_octet = int(config["macAddress"].split(":")[0], 16)
    assert first_octet & 0x02 and not first_octet & 0x01  # locally administered, unicast
    assert (bundle / "disk.img").read_bytes() == sparse_disk.read_bytes()


def test_tart_oci_layout_follows_tarts_push_format(
    spec: ImageSpec, sparse_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tart_oci, "CHUNK_SIZE", CHUNK)
    out = tmp_path / "out"
    out.mkdir()
    layout = output_format("tart-oci").write(format_job(spec, sparse_disk, out)).path

    def blob(digest: str) -> Path:
        algorithm, hexdigest = digest.split(":")
        path = layout / "blobs" / algorithm / hexdigest
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hexdigest
        return path

    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["mediaType"] == tart_oci.MANIFEST_TYPE
    manifest = json.loads(blob(entry["digest"]).read_text())
    assert manifest["mediaType"] == tart_oci.MANIFEST_TYPE
    assert manifest["config"]["mediaType"] == tart_oci.OCI_CONFIG_TYPE
    image_config = json.loads(blob(manifest["config"]["digest"]).read_text())
    assert (image_config["architecture"], image_config["os"]) == ("arm64", "linux")
    assert manifest["annotations"][tart_oci.UNCOMPRESSED_DISK_SIZE] == str(
        sparse_disk.stat().st_size
    )

    config_layer, *disk_layers = manifest["layers"]
    assert config_layer["mediaType"] == tart_oci.TART_CONFIG_TYPE
    assert json.loads(blob(config_layer["digest"]).read_text())["arch"] == "arm64"
    assert [layer["mediaType"] for layer in disk_layers] == [tart_oci.TART_DISK_TYPE] * 4
    reassembled = check_disk_layers(disk_layers, blob, sparse_disk)
    # the decoded layers are the disk, as its digest says
    assert reassembled == coreutils_digest(sparse_disk)
    # The hole chunk is stored once; the layout holds no stray temporary files.
    assert disk_layers[1]["digest"] != disk_layers[0]["digest"]
    assert not list(layout.rglob(".*.tmp"))


def test_the_same_disk_gives_the_same_layout(
    spec: ImageSpec, sparse_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tart_oci, "CHUNK_SIZE", CHUNK)
    digests = []
    for attempt in ("a", "b"):
        out = tmp_path / attempt
        out.mkdir()
        layout = output_format("tart-oci").write(format_job(spec, sparse_disk, out)).path
        digests.append(output_digest(layout, {}))
    assert digests[0] == digests[1]
