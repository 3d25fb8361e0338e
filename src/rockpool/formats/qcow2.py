"""qcow2: compressed, for QEMU and Incus."""

from __future__ import annotations

from pathlib import Path

from rockpool.build.context import BuildContext
from rockpool.formats import Output, OutputFormat
from rockpool.tools.qemu_img import convert_to_qcow2


class Qcow2Format(OutputFormat):
    name = "qcow2"
    filename = "disk.qcow2"

    def write(self, ctx: BuildContext, raw_disk: Path, out_dir: Path) -> Output:
        target = out_dir / self.filename
        task = ctx.reporter.task("qcow2: compressing", total=100)
        convert_to_qcow2(raw_disk, target, on_progress=task.update)
        task.done()
        return Output(self.name, target)
