"""A build context for tests that call one stage's helpers without a whole build."""

from __future__ import annotations

from pathlib import Path

from rockpool.build.context import BuildContext
from rockpool.build.plan import BuildPlan
from rockpool.formats import FormatJob
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec
from rockpool.store import Store


def quiet_context(spec: ImageSpec, work: Path, *, use_lock: bool = True) -> BuildContext:
    return BuildContext(
        plan=BuildPlan.resolve(spec, use_lock=use_lock),
        store=Store(work / "store"),
        work=work,
        reporter=Reporter(interactive=False, quiet=True),
        input_digest="0" * 64,
        source_date_epoch=0,
        log_path=work / "build.log",
    )


def format_job(spec: ImageSpec, raw_disk: Path, out_dir: Path) -> FormatJob:
    """What the formats stage gives a format, for a disk written by the test."""
    ctx = quiet_context(spec, out_dir.parent / "work")
    job = ctx.format_job()
    return FormatJob(**{**vars(job), "raw_disk": raw_disk, "out_dir": out_dir})
