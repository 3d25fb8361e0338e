"""raw: the assembled GPT disk itself, kept sparse (Tart's disk.img is this file)."""

from __future__ import annotations

import os
from pathlib import Path

from rockpool.command import run
from rockpool.context import BuildContext
from rockpool.formats import Output, OutputFormat


class RawFormat(OutputFormat):
    name = "raw"
    filename = "disk.raw"

    def write(self, ctx: BuildContext, raw_disk: Path, out_dir: Path) -> Output:
        target = out_dir / self.filename
        # The assembled disk is final and lies in the same store, so a hard link costs
        # nothing; a sparse copy is the fallback across filesystems.
        try:
            os.link(raw_disk, target)
        except OSError:
            run(["cp", "--sparse=always", "--reflink=auto", raw_disk, target])
        return Output(self.name, target)
