"""Output formats: each writes the assembled raw disk in the form a runtime needs.

A format is one small class; FORMATS lists them. Formats see only their FormatJob, never
the build, the store or a runtime, so they sit below the spec, which validates format
names against FORMATS.
"""

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
    architecture: str
    cpus: int
    memory: int  # bytes
    identity_seed: str  # the disk's ids and Tart's MAC derive from it (build/context.py)
    source_date_epoch: int
    reporter: Reporter
    raw_disk: Path  # the assembled disk; final, never written by a format
    out_dir: Path  # the version directory the format writes into
    work: Path  # the build's scratch directory


@dataclass(frozen=True)
class Output:
    """One file an output format wrote into the version directory."""

    format: str
    path: Path


class OutputFormat(ABC):
    """A backend that turns the raw disk into one runtime's form."""

    name: str
    filename: str
    # Tart runs only arm64 guests (Apple Silicon).
    architectures: tuple[str, ...] = ("amd64", "arm64")

    @abstractmethod
    def write(self, job: FormatJob) -> Output:
        """Write this format's file(s) into job.out_dir, leaving job.raw_disk untouched."""


def _registered() -> list[OutputFormat]:
    # Imported here: the submodules import this module's base classes.
    from rockpool.formats.qcow2 import Qcow2Format
    from rockpool.formats.raw import RawFormat
    from rockpool.formats.tart import TartBundleFormat
    from rockpool.formats.tart_oci import TartOciFormat

    return [RawFormat(), Qcow2Format(), TartBundleFormat(), TartOciFormat()]


FORMATS: dict[str, OutputFormat] = {backend.name: backend for backend in _registered()}
FORMAT_NAMES = tuple(FORMATS)
ARM64_ONLY_FORMATS = tuple(n for n, f in FORMATS.items() if f.architectures == ("arm64",))


def output_format(name: str) -> OutputFormat:
    return FORMATS[name]
