"""Copy a version's Tart OCI layout to a registry, for teams that share images.

The store itself needs no registry; this is the one way out of it. skopeo copies the
layout as it is (`--preserve-digests`): the manifest, config and Tart's disk layers
keep their bytes, media types and annotations, so `tart pull` gets exactly what the
build wrote.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

from rockpool import tools
from rockpool.errors import InvalidInput
from rockpool.formats.tart_oci import with_nvram
from rockpool.progress import Reporter
from rockpool.store import Store, Version
from rockpool.tools import skopeo, tart

OCI_FORMAT = "tart-oci"
# HOST[:PORT]/REPOSITORY[:TAG], the reference `tart pull` takes.
_REFERENCE = re.compile(
    r"^(?P<host>[a-zA-Z0-9.-]+(:[0-9]{1,5})?)"
    r"/(?P<repository>[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*)"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?$"
)


def destination_reference(destination: str, version: Version) -> str:
    """The full HOST/REPOSITORY:TAG; the tag defaults to the version id."""
    bare = destination.removeprefix("docker://")
    match = _REFERENCE.fullmatch(bare)
    if match is None:
        raise InvalidInput(
            f"'{destination}' is not a registry reference",
            hint="use HOST[:PORT]/REPOSITORY[:TAG], e.g. registry.example.com/rockpool/workspace",
        )
    return bare if match.group("tag") else f"{bare}:{version.id}"


def read_nvram(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"--nvram {path}: cannot read it ({exc.strerror})") from None
    if not data:
        raise InvalidInput(
            f"--nvram {path} is empty; Tart needs a real EFI variable store",
            hint="take nvram.bin from a VM made on macOS with: tart create --linux NAME",
        )
    return data


def nvram_for_push(nvram: Path | None) -> bytes:
    if nvram is not None:
        return read_nvram(nvram)
    if platform.system() == "Darwin":
        return tart.fresh_nvram()
    raise InvalidInput(
        "tart pull needs an nvram layer, and only macOS can create an EFI variable store",
        hint="push from macOS (rockpool makes one with tart create --linux), or pass "
        "--nvram PATH with an nvram.bin made once on a Mac (tart create --linux NAME)",
    )


def push(
    version: Version,
    destination: str,
    store: Store,
    reporter: Reporter,
    *,
    insecure: bool,
    nvram: Path | None = None,
) -> str:
    layout: Path = version.output_path(OCI_FORMAT)
    reference = destination_reference(destination, version)
    tools.require(tools.PUSH, "pushing an image to a registry")
    nvram_bytes = nvram_for_push(nvram)
    reporter.info(f"pushing {version.ref} to {reference}")
    with store.staging() as work:
        complete = with_nvram(layout, nvram_bytes, work / "oci")
        skopeo.copy_layout(complete, reference, insecure=insecure, on_line=reporter.status)
    return reference
