"""What every output format is: a small class that writes a FormatJob's raw disk in
one runtime's form."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from rockpool.progress import Reporter


@dataclass(frozen=True)
class FormatJob:
    """What a format needs of the build: the image, its identity seed and epoch, where
    to report progress, and the paths it reads and writes."""

    image: str
    description: str
    suite: str
    architecture: str
    cpus: int
    memory: int  # bytes
    identity_seed: str  # the disk's ids and Tart's MAC derive from it (build/context.py)
    source_date_epoch: int
    reporter: Reporter
    raw_disk: Path  # the assembled disk; final, never written by a format
    out_dir: Path  # the version directory the format writes into
    work: Path  # the build's scratch directory
    # The finished root tree the disk was made from, for formats with needs_root; None
    # where the build has none (the Packer path, whose disk a VM wrote).
    root: Path | None = None


@dataclass(frozen=True)
class Output:
    """One file an output format wrote into the version directory."""

    format: str
    path: Path


class OutputFormat(ABC):
    """A backend that turns the raw disk into one runtime's form."""

    name: str
    filename: str
    # The guest architectures its runtime runs.
    architectures: tuple[str, ...] = ("amd64", "arm64")
    # Formats this one's runtime also needs in the version (Incus's VM image: the qcow2).
    requires: tuple[str, ...] = ()
    # Whether it reads the root tree rather than the disk: a build whose disk comes
    # from the stage cache then assembles the disk again, from the cached root.
    needs_root: bool = False

    @abstractmethod
    def write(self, job: FormatJob) -> Output:
        """Write this format's file(s) into job.out_dir, leaving job.raw_disk untouched."""
