"""incus and incus-container: the image in the two forms `incus image import` takes.

- incus: the split VM image, a metadata tarball beside the version's disk.qcow2 (the
  qcow2 format, which this one requires): `incus image import incus.tar disk.qcow2`.
- incus-container: a system-container image of the same root, the metadata tarball and
  the root as squashfs, in the directory incus-container/.

metadata.yaml is written as JSON, which YAML reads as it is. The version id cannot be
in it (it is the digest of the outputs, this one included); `rockpool image install`
sets it as a property when it imports.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from rockpool.arch import ARCHITECTURES
from rockpool.errors import RockpoolError
from rockpool.formats.base import FormatJob, Output, OutputFormat
from rockpool.tools.squashfs import make_squashfs

METADATA = "metadata.tar"
ROOTFS = "rootfs.squashfs"
# The marker a copy finds at its first start: rockpool-identity.service then removes
# the SSH host keys the source made (setup.sh), before new ones are made.
NEW_IDENTITY_MARKER = "/var/lib/rockpool/new-identity"
# Incus renders these into a container: `when` names the events (create: from the
# image; copy: `incus copy`), applied at the next start.
CONTAINER_TEMPLATES: dict[str, tuple[list[str], str]] = {
    "/etc/hostname": (["create", "copy"], "{{ instance.name }}\n"),
    # Empty: systemd makes a new machine-id at the copy's first boot.
    "/etc/machine-id": (["copy"], ""),
    NEW_IDENTITY_MARKER: (["copy"], "copied from another instance\n"),
}


def metadata(job: FormatJob, instance_type: str) -> dict[str, Any]:
    """metadata.yaml: what Incus needs (architecture, a non-zero creation date) and
    what `incus image info` shows (properties)."""
    data: dict[str, Any] = {
        "architecture": ARCHITECTURES[job.architecture].qemu,  # Incus: x86_64, aarch64
        "creation_date": max(job.source_date_epoch, 1),
        "properties": {
            "os": "debian",
            "release": job.suite,
            "variant": "rockpool",
            "architecture": job.architecture,
            "description": job.description or f"Rockpool workspace {job.image} ({job.suite})",
            "rockpool.image": job.image,
        },
    }
    if instance_type == "virtual-machine":
        # systemd-boot is not signed: Incus, whose VMs boot with Secure Boot on by
        # default, reads an image's requirements from its properties and turns it off.
        data["properties"]["requirements.secureboot"] = "false"
    else:
        data["templates"] = {
            path: {"when": when, "template": _template_name(path)}
            for path, (when, _) in CONTAINER_TEMPLATES.items()
        }
    return data


def _template_name(path: str) -> str:
    return path.strip("/").replace("/", "-") + ".tpl"


def write_metadata_tarball(target: Path, job: FormatJob, instance_type: str) -> None:
    """The metadata tarball, the same bytes for the same job: sorted members, one owner,
    the build's epoch as every time."""
    files = {"metadata.yaml": json.dumps(metadata(job, instance_type), indent=2) + "\n"}
    if instance_type == "container":
        files |= {
            f"templates/{_template_name(path)}": content
            for path, (_, content) in CONTAINER_TEMPLATES.items()
        }
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted({name.rpartition("/")[0] for name in files if "/" in name})
        for directory in directories:
            info = _info(directory, job.source_date_epoch, tarfile.DIRTYPE, 0o755)
            tar.addfile(info)
        for name in sorted(files):
            data = files[name].encode()
            info = _info(name, job.source_date_epoch, tarfile.REGTYPE, 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _info(name: str, epoch: int, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, epoch
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


class IncusVmFormat(OutputFormat):
    name = "incus"
    filename = "incus.tar"
    requires = ("qcow2",)

    def write(self, job: FormatJob) -> Output:
        target = job.out_dir / self.filename
        write_metadata_tarball(target, job, "virtual-machine")
        return Output(self.name, target)


class IncusContainerFormat(OutputFormat):
    name = "incus-container"
    filename = "incus-container"
    needs_root = True

    def write(self, job: FormatJob) -> Output:
        if job.root is None:
            raise RockpoolError(
                "the incus-container format needs the image's root tree, which this "
                "build does not have (the Packer path writes only a disk)",
                hint="build it with the default builder, or drop incus-container from "
                "image.formats",
            )
        directory = job.out_dir / self.filename
        directory.mkdir()
        write_metadata_tarball(directory / METADATA, job, "container")
        task = job.reporter.task("incus-container: squashfs of the root", total=1)
        make_squashfs(job.root, directory / ROOTFS, job.source_date_epoch)
        task.done()
        return Output(self.name, directory)
