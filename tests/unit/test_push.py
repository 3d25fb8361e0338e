"""image push: destination references, and what it refuses before any copying."""

from __future__ import annotations

from pathlib import Path

import pytest

from rockpool import tools
from rockpool.errors import InvalidInput, MissingTool, NotFound
from rockpool.progress import Reporter
from rockpool.push import destination_reference, push
from rockpool.store import Store, Version


def version(tmp_path: Path, outputs: dict[str, dict[str, str]]) -> Version:
    path = tmp_path / "images" / "workspace-arm64" / "0123456789ab"
    (path / "tart-oci").mkdir(parents=True, exist_ok=True)
    return Version("workspace-arm64", "0123456789ab", path, {"outputs": outputs})


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("registry.example.com/rockpool/ws", "registry.example.com/rockpool/ws:0123456789ab"),
        ("docker://127.0.0.1:5000/ws:v1", "127.0.0.1:5000/ws:v1"),
        ("ghcr.io/acme/images/workspace:2026-11", "ghcr.io/acme/images/workspace:2026-11"),
    ],
)
def test_destination_reference(tmp_path: Path, destination: str, expected: str) -> None:
    assert destination_reference(destination, version(tmp_path, {})) == expected


@pytest.mark.parametrize("destination", ["workspace", "Registry/UPPER", "host/repo:bad tag", ""])
def test_bad_destinations_are_refused(tmp_path: Path, destination: str) -> None:
    with pytest.raises(InvalidInput, match="registry reference"):
        destination_reference(destination, version(tmp_path, {}))


def test_push_refuses_what_it_cannot_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "store")
    reporter = Reporter(interactive=False, quiet=True)
    no_oci = version(tmp_path, {"qcow2": {"file": "disk.qcow2"}})
    with pytest.raises(NotFound, match="no tart-oci output"):
        push(no_oci, "127.0.0.1:5000/ws", store, reporter, insecure=True)

    with_oci = version(tmp_path, {"tart-oci": {"file": "tart-oci"}})
    # Off macOS there is no nvram.bin unless one is given.
    with pytest.raises(InvalidInput, match="nvram") as refused:
        push(with_oci, "127.0.0.1:5000/ws", store, reporter, insecure=True)
    assert "--nvram" in str(refused.value.hint)
    empty = tmp_path / "nvram.bin"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty"):
        push(with_oci, "127.0.0.1:5000/ws", store, reporter, insecure=True, nvram=empty)

    monkeypatch.setattr(tools, "CLEAN_PATH", str(tmp_path / "no-tools"))
    with pytest.raises(MissingTool, match="skopeo") as missing:
        push(with_oci, "127.0.0.1:5000/ws", store, reporter, insecure=True)
    assert "apt-get install skopeo" in str(missing.value.hint)
