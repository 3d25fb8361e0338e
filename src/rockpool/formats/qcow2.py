"""qcow2: compressed, for QEMU and Incus."""

from __future__ import annotations

import re

from rockpool.command import run
from rockpool.formats.base import FormatJob, Output, OutputFormat

_PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


class Qcow2Format(OutputFormat):
    name = "qcow2"
    filename = "disk.qcow2"

    def write(self, job: FormatJob) -> Output:
        target = job.out_dir / self.filename
        task = job.reporter.task("qcow2: compressing", total=100)

        def progress(line: str) -> None:
            for match in _PERCENT.finditer(line):
                task.update(float(match.group(1)))

        # zlib compression: every qemu-img reads it; writes stay in order (no -W), so
        # the same raw disk always gives the same qcow2.
        run(
            [
                "qemu-img",  # checked with the other build tools before the build
                "convert",
                "-p",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "cluster_size=65536",
                job.raw_disk,
                target,
            ],
            on_line=progress,
        )
        task.done()
        return Output(self.name, target)
