"""Output formats: each writes the assembled raw disk in the form a runtime needs.

A format is one small class (formats/base.py); FORMATS lists them. Formats see only
their FormatJob, never the build, the store or a runtime, so they sit below the spec,
which validates format names against FORMATS.
"""

from __future__ import annotations

from rockpool.formats.base import FormatJob, Output, OutputFormat
from rockpool.formats.incus import IncusContainerFormat, IncusVmFormat
from rockpool.formats.qcow2 import Qcow2Format
from rockpool.formats.raw import RawFormat
from rockpool.formats.tart import TartBundleFormat
from rockpool.formats.tart_oci import TartOciFormat

__all__ = ["FORMATS", "FORMAT_NAMES", "FormatJob", "Output", "OutputFormat", "output_format"]

# Every backend is imported with this package, before any build starts: a build runs
# for up to an hour and a half and must not import code changed on disk meanwhile.
FORMATS: dict[str, OutputFormat] = {
    backend.name: backend
    for backend in (
        RawFormat(),
        Qcow2Format(),
        TartBundleFormat(),
        TartOciFormat(),
        IncusVmFormat(),
        IncusContainerFormat(),
    )
}
FORMAT_NAMES = tuple(FORMATS)
# Tart runs only arm64 guests (Apple Silicon).
ARM64_ONLY_FORMATS = tuple(n for n, f in FORMATS.items() if f.architectures == ("arm64",))


def output_format(name: str) -> OutputFormat:
    return FORMATS[name]
