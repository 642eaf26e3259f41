"""What moe-compress prints while it works: one progress display, a verbosity, and consoles
that do not wrap when nobody reads them on a terminal.

Verbosity (``--quiet`` / ``--verbose``, or MOE_COMPRESS_QUIET=1 / MOE_COMPRESS_VERBOSE=1):
  * quiet: nothing but results (stdout), warnings and errors (stderr);
  * normal: results, plus our own progress bars and notes on stderr; the libraries we use
    (transformers, datasets, lm-eval, tqdm bars, Python warnings) are silenced;
  * verbose: as normal, and the libraries speak as they would on their own.

Progress: `track` (a loop with a known length) and `step` (one long call) share one live
display on a terminal: a bar per running task that names what it does, removed when the task
ends, and one summary line for every task that took long enough to matter. When stderr is not
a terminal (a log file, a pipe, CI) nothing is animated: a task prints one line when it ends
and, if it runs long, one line a minute while it runs -- so logs stay short and readable.

Consoles: tables and lines are wrapped to the terminal's width on a terminal, and never
wrapped otherwise (rich's default of 80 columns would break every table in a log).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

T = TypeVar("T")
Verbosity = Literal["quiet", "normal", "verbose"]
VERBOSITIES: tuple[Verbosity, ...] = ("quiet", "normal", "verbose")

#: A task shorter than this leaves no summary line behind.
SUMMARY_AFTER_S = 2.0
#: Off a terminal, a running task reports at most this often.
HEARTBEAT_S = 60.0
#: Width used when output is not a terminal: wide enough that nothing is ever wrapped.
UNWRAPPED_WIDTH = 100_000

_level: Verbosity | None = None  # None: follow the environment (tests and library users set it there)


def _environment_level() -> Verbosity:
    def on(name: str) -> bool:
        return os.environ.get(name, "").lower() in ("1", "true", "yes")

    return "quiet" if on("MOE_COMPRESS_QUIET") else "verbose" if on("MOE_COMPRESS_VERBOSE") else "normal"


def verbosity() -> Verbosity:
    return _level or _environment_level()


def set_verbosity(level: Verbosity | None) -> Verbosity | None:
    """Set the verbosity (None: follow the environment again); returns the previous setting."""
    global _level
    if level is not None and level not in VERBOSITIES:
        raise ValueError(f"verbosity must be one of {VERBOSITIES}; got {level!r}")
    previous, _level = _level, level
    return previous


@contextmanager
def verbosity_set(level: Verbosity | None) -> Iterator[None]:
    """The block at `level` (None: as it is), the previous setting restored after it."""
    previous = set_verbosity(level) if level else None
    try:
        yield
    finally:
        if level:
            set_verbosity(previous)


#: The command line's verbosity flags, accepted before or after the command name.
VERBOSITY_FLAGS: dict[str, Verbosity] = {"--quiet": "quiet", "-q": "quiet", "--verbose": "verbose", "-v": "verbose"}


def verbosity_from(args: list[str]) -> tuple[list[str], Verbosity | None]:
    """Take the verbosity flags out of `args` wherever they are (`moe-compress prune ... --quiet`
    reads as naturally as `moe-compress --quiet prune ...`); the last one given wins."""
    level = None
    rest = []
    for position, arg in enumerate(args):
        if arg == "--":  # everything after it is an argument, never a flag
            rest += args[position:]
            break
        if arg in VERBOSITY_FLAGS:
            level = VERBOSITY_FLAGS[arg]
        else:
            rest.append(arg)
    return rest, level


def progress_enabled() -> bool:
    return verbosity() != "quiet"


class _Console(Console):
    """A rich console that wraps at the terminal's width on a terminal and never wraps elsewhere."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


#: Results: tables, numbers, what was written (stdout).
results = _Console()
#: Progress, notes, warnings and errors (stderr). soft_wrap: an error line stays one line.
messages = _Console(stderr=True, soft_wrap=True)


def say(text: str) -> None:
    """One result line on stdout, printed as it is (paths may hold [brackets]: no markup)."""
    results.print(text, markup=False, highlight=False)


def show(blocks: Iterable[Table | str]) -> None:
    """Print what the library reports: tables with their title on a line of their own, result lines as they are
    (lines that qualify the results are part of them: stdout, never a table caption); empty lines are skipped."""
    for block in blocks:
        if isinstance(block, Table):
            show_table(block)
        elif block:
            say(block)


def show_table(table) -> None:
    """A result table (rich `Table`) with its title on a line of its own: rich wraps a title to
    the table's width, which would cut a long path in two."""
    if table.title:
        say(str(table.title))
        table.title = None
    results.print(table)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


class _Display:
    """The single live display every task shares (nested tasks become extra rows)."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.running = 0

    def _live(self) -> Progress:
        if self.progress is None:
            columns = (
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            )
            self.progress = Progress(*columns, console=messages, transient=True)
            self.progress.start()
        return self.progress

    @contextmanager
    def task(self, description: str, total: int | None, completed: int = 0) -> Iterator[_Task]:
        task = _Task(self, description, total, completed)
        self.running += 1
        try:
            yield task
        finally:
            self.running -= 1
            task.finish()
            if self.running == 0 and self.progress is not None:
                self.progress.stop()
                self.progress = None


class _Task:
    """One running task: a row of the live display, or periodic lines off a terminal."""

    def __init__(self, display: _Display, description: str, total: int | None, completed: int = 0) -> None:
        self.display, self.description, self.total = display, description, total
        self.done = self.resumed_at = completed
        self.status = ""
        self.start = self.last_report = time.perf_counter()
        self.row: TaskID | None = None
        if messages.is_terminal:
            self.row = display._live().add_task(escape(description), total=total, completed=completed)

    def _label(self) -> str:
        return f"{self.description} ({self.status})" if self.status else self.description

    def advance(self, status: str | None = None, steps: int = 1) -> None:
        """One step (or `steps`) done; `status` replaces the text shown beside the description."""
        self.done += steps
        if status is not None:
            self.status = status
        if self.row is not None and self.display.progress is not None:
            self.display.progress.update(self.row, advance=steps, description=escape(self._label()))
            return
        now = time.perf_counter()
        if now - self.last_report >= HEARTBEAT_S and self.done != self.total:  # the last step gets its "done" line
            self.last_report = now
            messages.print(f"{self._label()}: {self._count()}, {_duration(now - self.start)} elapsed{self._eta(now)}", markup=False, highlight=False)

    def _count(self) -> str:
        return f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"

    def _eta(self, now: float) -> str:
        worked = self.done - self.resumed_at
        if not self.total or not worked:
            return ""
        return f", about {_duration((now - self.start) / worked * (self.total - self.done))} left"

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.start
        if self.row is not None and self.display.progress is not None:
            self.display.progress.remove_task(self.row)
        if elapsed >= SUMMARY_AFTER_S:
            count = f" {self._count()}" if self.total is not None else ""
            messages.print(f"{self._label()}:{count} done in {_duration(elapsed)}", markup=False, highlight=False)


_display = _Display()


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over `items` with a progress bar named `description` (nothing in quiet mode)."""
    if not progress_enabled():
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with _display.task(description, total) as task:
        for item in items:
            yield item
            task.advance()


@contextmanager
def status_bar(description: str, total: int, completed: int = 0) -> Iterator[_Task | _Silent]:
    """A bar whose row also shows a changing status (e.g. the best value so far), with an ETA.

    `completed` starts the bar part-way, for work resumed from a saved state; call
    `advance(status, steps)` on what it yields. Nothing is shown when quiet.
    """
    if not progress_enabled():
        yield _Silent()
        return
    with _display.task(description, total, completed) as task:
        yield task


class _Silent:
    """What `status_bar` yields when quiet: it counts nothing and shows nothing."""

    def advance(self, status: str | None = None, steps: int = 1) -> None:
        pass


@contextmanager
def step(description: str) -> Iterator[None]:
    """A long call without a loop to count (loading, saving, scoring tasks): a spinner and its time."""
    if not progress_enabled():
        yield
        return
    with _display.task(description, None):
        yield


@contextmanager
def libraries_silenced() -> Iterator[None]:
    """Route what libraries write to Python's stderr (tqdm bars, stray prints) to nowhere, unless
    verbose; our own display keeps writing to the real stderr."""
    if verbosity() == "verbose":
        yield
        return
    real, pinned = sys.stderr, messages._file  # type: ignore[attr-defined]
    messages.file = real
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = real
            messages._file = pinned  # type: ignore[attr-defined]  # None again: follow sys.stderr


#: Environment read by libraries when they are first imported (the CLI sets it before importing them).
_QUIET_ENVIRONMENT = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "DATASETS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",  # tqdm >= 4.66: the default of every bar that does not set `disable` itself
}
#: Loggers of libraries we call, raised to ERROR unless verbose.
_LIBRARY_LOGGERS = ("transformers", "datasets", "huggingface_hub", "lm_eval", "lm-eval", "accelerate", "torch", "compressed_tensors", "filelock", "urllib3")


@contextmanager
def libraries_quiet() -> Iterator[None]:
    """Silence library logs, progress bars and Python warnings for the block (not when verbose).

    Used around one CLI command; everything is restored afterwards, so a program that calls
    the CLI in-process (the tests) keeps its own settings.
    """
    import logging
    import warnings

    if verbosity() == "verbose":
        yield
        return
    saved_environment = {name: os.environ.get(name) for name in _QUIET_ENVIRONMENT}
    os.environ.update(_QUIET_ENVIRONMENT)
    saved_levels = {name: logging.getLogger(name).level for name in _LIBRARY_LOGGERS}
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    restore_bars = _disable_imported_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for restore in restore_bars:
            restore()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _disable_imported_bars() -> list:
    """Turn off the progress bars of libraries imported before the environment was set; returns undo functions."""
    undo = []
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        if transformers_logging.is_progress_bar_enabled():
            transformers_logging.disable_progress_bar()
            undo.append(transformers_logging.enable_progress_bar)
    if "datasets" in sys.modules:
        from datasets.utils import logging as datasets_logging

        if datasets_logging.is_progress_bar_enabled():
            datasets_logging.disable_progress_bar()
            undo.append(datasets_logging.enable_progress_bar)
    return undo
