"""raw: the assembled GPT disk itself, kept sparse (Tart's disk.img is this file)."""

from __future__ import annotations

from pathlib import Path

from rockpool.build.context import BuildContext
from rockpool.files import link_or_copy
from rockpool.formats import Output, OutputFormat


class RawFormat(OutputFormat):
    name = "raw"
    filename = "disk.raw"

    def write(self, ctx: BuildContext, raw_disk: Path, out_dir: Path) -> Output:
        target = out_dir / self.filename
        link_or_copy(raw_disk, target)
        return Output(self.name, target)
