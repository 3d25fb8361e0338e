"""A build context for tests that call one stage's helpers without a whole build."""

from __future__ import annotations

from pathlib import Path

from rockpool.build.context import BuildContext
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec
from rockpool.store import Store


def quiet_context(spec: ImageSpec, work: Path) -> BuildContext:
    return BuildContext(
        spec=spec,
        store=Store(work / "store"),
        work=work,
        reporter=Reporter(interactive=False, quiet=True),
        input_digest="0" * 64,
        source_date_epoch=0,
        log_path=work / "build.log",
    )
