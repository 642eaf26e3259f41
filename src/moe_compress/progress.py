"""Progress bars for long loops; silent when the library is used quietly or under tests."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def progress_enabled() -> bool:
    return os.environ.get("MOE_COMPRESS_QUIET", "") not in ("1", "true", "yes")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on stderr (skipped when MOE_COMPRESS_QUIET=1)."""
    if not progress_enabled():
        yield from items
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
        for item in items:
            yield item
            bar.advance(task)


class _Status:
    """A live progress line: `advance(status)` moves one step and shows `status` beside the bar."""

    def __init__(self, bar: Progress | None, task: int | None):
        self._bar, self._task = bar, task

    def advance(self, status: str = "", steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=steps, status=status)


@contextmanager
def status_bar(description: str, total: int, completed: int = 0) -> Iterator[_Status]:
    """A bar with a changing status text (e.g. the best value so far) and an ETA; silent when quiet.

    `completed` starts the bar part-way, for work resumed from a saved state.
    """
    if not progress_enabled():
        yield _Status(None, None)
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, completed=completed, status="")
        yield _Status(bar, task)
