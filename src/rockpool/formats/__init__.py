"""Output formats: each writes the assembled raw disk in the form a runtime needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rockpool.build.context import BuildContext

# Kept here, free of imports, so that spec validation can name the valid formats.
FORMAT_NAMES = ("raw", "qcow2", "tart", "tart-oci")
# Tart runs only arm64 guests (Apple Silicon).
ARM64_ONLY_FORMATS = ("tart", "tart-oci")


@dataclass(frozen=True)
class Output:
    """One file an output format wrote into the version directory."""

    format: str
    path: Path


class OutputFormat(ABC):
    """A backend that turns the raw disk into one runtime's form."""

    name: str
    filename: str

    @abstractmethod
    def write(self, ctx: BuildContext, raw_disk: Path, out_dir: Path) -> Output:
        """Write this format's file(s) into out_dir, leaving raw_disk untouched."""


def output_format(name: str) -> OutputFormat:
    from rockpool.formats.qcow2 import Qcow2Format
    from rockpool.formats.raw import RawFormat
    from rockpool.formats.tart import TartBundleFormat
    from rockpool.formats.tart_oci import TartOciFormat

    backends: list[OutputFormat] = [RawFormat(), Qcow2Format(), TartBundleFormat(), TartOciFormat()]
    return next(backend for backend in backends if backend.name == name)
