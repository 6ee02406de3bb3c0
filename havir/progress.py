"""Progress for long work, on stderr so that stdout stays machine-readable (``--json``).

On a terminal it is a rich bar (with a status such as the current losses); when stderr is a file
or a pipe (SLURM, nohup, CI), where a bar prints nothing useful, it is plain lines at a steady
cadence, each complete on its own::

    22:31:05 training: 6/20 epochs (30%), 1.2 epochs/s, ETA 12s; loss structural 0.412, semantic 0.903
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")

#: The one console for progress and messages; results go to stdout elsewhere.
stderr_console = Console(stderr=True)

#: Cadence of the plain lines: one each time another tenth of the work is done, and one at least
#: every 30 s of work (checked as each step ends).
LINE_EVERY_PERCENT = 10
LINE_EVERY_SECONDS = 30.0


def _duration(seconds: float) -> str:
    """``"45s"``, ``"12m05s"``, ``"3h02m"``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Lines:
    """Plain progress lines (stderr is not a terminal)."""

    def __init__(self, description: str, total: int, unit: str):
        self.description, self.total, self.unit = description, total, unit
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.next_percent = LINE_EVERY_PERCENT

    def advance(self, steps: int, status: str) -> None:
        self.done += steps
        now = time.monotonic()
        percent = 100 * self.done / self.total if self.total else 100.0
        if percent < self.next_percent and now - self.last_line < LINE_EVERY_SECONDS:
            return
        while self.next_percent <= percent:
            self.next_percent += LINE_EVERY_PERCENT
        self.last_line = now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else float("inf")
        parts = [f"{self.description}: {self.done}/{self.total} {self.unit} ({percent:.0f}%)", f"{rate:.3g} {self.unit}/s"]
        if self.done < self.total and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        line = time.strftime("%H:%M:%S ") + ", ".join(parts) + (f"; {status}" if status else "")
        stderr_console.print(line, markup=False, highlight=False, soft_wrap=True)


class _Bar:
    """A rich bar (stderr is a terminal), removed when the work is done."""

    def __init__(self, progress: Progress, task):
        self.progress, self.task = progress, task

    def advance(self, steps: int, status: str) -> None:
        self.progress.update(self.task, advance=steps, status=status)


class ProgressReport:
    """Where a long loop reports: ``report.advance(steps=1, status="")`` after each step;
    ``status`` (e.g. the current losses) is shown beside the count. Does nothing when disabled."""

    def __init__(self, sink: _Lines | _Bar | None):
        self._sink = sink

    def advance(self, steps: int = 1, status: str = "") -> None:
        if self._sink is not None:
            self._sink.advance(steps, status)


@contextlib.contextmanager
def progress_report(description: str, total: int, *, unit: str = "steps", enabled: bool = True) -> Iterator[ProgressReport]:
    """Report the progress of ``total`` steps of work (a bar on a terminal, else plain lines).

    Parameters
    ----------
    description : what is being done, e.g. ``"subj01: reading sessions"``.
    total : number of steps the work has.
    unit : what a step is, plural (``"sessions"``, ``"epochs"``, ``"images"``), for the lines.
    enabled : False reports nothing (a notebook or a test that wants silence).
    """
    if not enabled:
        yield ProgressReport(None)
        return
    if not stderr_console.is_terminal:
        yield ProgressReport(_Lines(description, total, unit))
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=stderr_console, transient=True) as progress:
        yield ProgressReport(_Bar(progress, progress.add_task(description, total=total, status="")))


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True, unit: str = "steps",
          status: Callable[[], str] | None = None) -> Iterator[T]:
    """Iterate over ``items`` reporting progress on stderr (see :func:`progress_report`);
    ``status()``, when given, is called as each step ends and shown beside the count."""
    items = list(items) if total is None else items
    with progress_report(description, len(items) if total is None else total, unit=unit, enabled=enabled) as report:
        for item in items:
            yield item
            report.advance(status=status() if status else "")
