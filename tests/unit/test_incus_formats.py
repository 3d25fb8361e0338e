"""The incus and incus-container formats' metadata tarballs: what Incus reads from them,
the same bytes for the same build, and the templates that give a copy its own identity."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from rockpool.formats.base import FormatJob
from rockpool.formats.incus import CONTAINER_TEMPLATES, write_metadata_tarball
from rockpool.progress import Reporter


def job(tmp_path: Path, architecture: str = "amd64") -> FormatJob:
    return FormatJob(
        image="workspace",
        description="a workspace",
        suite="trixie",
        architecture=architecture,
        cpus=2,
        memory=4 << 30,
        identity_seed="seed",
        source_date_epoch=1_700_000_000,
        reporter=Reporter(interactive=False, quiet=True),
        raw_disk=tmp_path / "disk.raw",
        out_dir=tmp_path,
        work=tmp_path,
    )


def members(tarball: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tarball) as tar:
        return {member.name: member for member in tar.getmembers()}


def metadata_of(tarball: Path) -> dict[str, object]:
    with tarfile.open(tarball) as tar:
        handle = tar.extractfile("metadata.yaml")
        assert handle is not None
        return dict(json.loads(handle.read()))


@pytest.mark.parametrize(
    ("architecture", "incus_name"), [("amd64", "x86_64"), ("arm64", "aarch64")]
)
def test_vm_metadata_has_what_incus_requires(
    tmp_path: Path, architecture: str, incus_name: str
) -> None:
    target = tmp_path / "incus.tar"
    write_metadata_tarball(target, job(tmp_path, architecture), "virtual-machine")
    data = metadata_of(target)
    assert data["architecture"] == incus_name
    assert data["creation_date"] == 1_700_000_000
    properties = data["properties"]
    assert isinstance(properties, dict)
    assert properties["requirements.secureboot"] == "false"
    assert properties["os"] == "debian" and properties["release"] == "trixie"
    assert properties["variant"] == "rockpool" and properties["description"] == "a workspace"
    assert "templates" not in data
    assert set(members(target)) == {"metadata.yaml"}


def test_container_metadata_templates_the_identity_of_a_copy(tmp_path: Path) -> None:
    target = tmp_path / "meta.tar"
    write_metadata_tarball(target, job(tmp_path), "container")
    data = metadata_of(target)
    templates = data["templates"]
    assert isinstance(templates, dict)
    assert templates["/etc/machine-id"]["when"] == ["copy"]
    assert templates["/etc/hostname"]["when"] == ["create", "copy"]
    properties = data["properties"]
    assert isinstance(properties, dict)
    assert not any(key.startswith("requirements.") for key in properties)
    names = members(target)
    for entry in templates.values():
        assert f"templates/{entry['template']}" in names
    assert len(templates) == len(CONTAINER_TEMPLATES)


def test_metadata_tarballs_are_the_same_bytes_for_the_same_build(tmp_path: Path) -> None:
    first, second, later = tmp_path / "a.tar", tmp_path / "b.tar", tmp_path / "c.tar"
    write_metadata_tarball(first, job(tmp_path), "container")
    write_metadata_tarball(second, job(tmp_path), "container")
    assert first.read_bytes() == second.read_bytes()
    for member in members(first).values():
        assert (member.mtime, member.uid, member.gid) == (1_700_000_000, 0, 0)
    write_metadata_tarball(
        later, replace(job(tmp_path), source_date_epoch=1_800_000_000), "container"
    )
    assert later.read_bytes() != first.read_bytes()


def test_a_build_without_a_root_tree_gets_a_clear_error(tmp_path: Path) -> None:
    from rockpool.errors import RockpoolError
    from rockpool.formats import output_format

    with pytest.raises(RockpoolError, match="needs the image's root tree"):
        output_format("incus-container").write(job(tmp_path))
    assert not (tmp_path / "incus-container").exists()
