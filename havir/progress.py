"""Progress bars for long work, on stderr so that stdout stays machine-readable (``--json``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track as _rich_track

T = TypeVar("T")

#: The one console for progress and messages; results go to stdout elsewhere.
stderr_console = Console(stderr=True)


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` with a rich progress bar on stderr (none when ``enabled`` is False)."""
    if not enabled:
        yield from items
        return
    yield from _rich_track(items, description=description, total=total, console=stderr_console, transient=True)
