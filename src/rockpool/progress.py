"""What a person sees during long work: the stage, its elapsed time, and progress bars."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)


class Task:
    """A measurable piece of work shown as a bar (or nothing when not interactive)."""

    def __init__(self, reporter: Reporter, task_id: TaskID | None) -> None:
        self._reporter = reporter
        self._id = task_id

    def update(self, completed: float) -> None:
        if self._id is not None and self._reporter.progress is not None:
            self._reporter.progress.update(self._id, completed=completed)

    def done(self) -> None:
        if self._id is not None and self._reporter.progress is not None:
            self._reporter.progress.remove_task(self._id)


class Reporter:
    """Live display on a terminal; plain stage lines on stderr otherwise."""

    def __init__(self, *, interactive: bool | None = None, quiet: bool = False) -> None:
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.interactive = (
            self.console.is_terminal if interactive is None else interactive
        ) and not quiet
        self.progress: Progress | None = None
        self._stage_id: TaskID | None = None
        self._stage_name = ""

    def __enter__(self) -> Reporter:
        if self.interactive:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def info(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """Something the user should fix, which did not stop the command; shown even
        with -q."""
        message = f"warning: {text}"
        if self.progress is not None:
            self.progress.console.print(message, highlight=False, markup=False)
        else:
            print(message, file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        self._stage_name = name
        if self.progress is not None:
            self._stage_id = self.progress.add_task(name, total=None)
        else:
            self.info(f"==> {name}")
        try:
            yield
        finally:
            elapsed = time.monotonic() - started
            if self.progress is not None and self._stage_id is not None:
                self.progress.remove_task(self._stage_id)
                self._stage_id = None
            self.info(f"    {name}: {elapsed:.1f}s")

    def status(self, text: str) -> None:
        """The latest line of a long command, shown beside the current stage."""
        if self.progress is not None and self._stage_id is not None and text.strip():
            short = text.strip()[:70]
            self.progress.update(self._stage_id, description=f"{self._stage_name}  · {short}")

    def task(self, description: str, total: float) -> Task:
        if self.progress is None:
            return Task(self, None)
        return Task(self, self.progress.add_task(description, total=total))
