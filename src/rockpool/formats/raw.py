"""raw: the assembled GPT disk itself, kept sparse (Tart's disk.img is this file)."""

from __future__ import annotations

from rockpool.files import link_or_copy
from rockpool.formats.base import FormatJob, Output, OutputFormat


class RawFormat(OutputFormat):
    name = "raw"
    filename = "disk.raw"

    def write(self, job: FormatJob) -> Output:
        target = job.out_dir / self.filename
        link_or_copy(job.raw_disk, target)
        return Output(self.name, target)
