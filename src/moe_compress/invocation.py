"""The command line a run was started with, for the model card of what it writes.

The CLI records its arguments for the duration of one command (`recording`); `save_compressed`
reads them (`command_line`) so that every saved checkpoint says how it was made. The Python API
records nothing: its outputs say they were made through the API.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from contextlib import contextmanager

_current: list[str] | None = None


@contextmanager
def recording(argv: list[str]) -> Iterator[None]:
    global _current
    previous, _current = _current, [str(a) for a in argv]
    try:
        yield
    finally:
        _current = previous


def command_line() -> str | None:
    """The running command as a shell line (quoted so it can be pasted back), or None outside the CLI."""
    return shlex.join(_current) if _current else None
