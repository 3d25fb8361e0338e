"""qcow2: compressed, for QEMU and Incus."""

from __future__ import annotations

from rockpool.formats.base import FormatJob, Output, OutputFormat
from rockpool.tools.qemu_img import convert_to_qcow2


class Qcow2Format(OutputFormat):
    name = "qcow2"
    filename = "disk.qcow2"

    def write(self, job: FormatJob) -> Output:
        target = job.out_dir / self.filename
        task = job.reporter.task("qcow2: compressing", total=100)
        convert_to_qcow2(job.raw_disk, target, on_progress=task.update)
        task.done()
        return Output(self.name, target)
