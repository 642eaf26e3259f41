"""Checks of values a user gives that need no model: the arguments of every command, and paths written at the end of a run.

They run before anything is loaded, so a mistake costs a second, not a calibration. Importing
this costs nothing (no torch).
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OptionError, param


def check_arguments(arguments: dict[str, object]) -> None:
    """What every command checks before anything else: a model that cannot be found is answered first, before
    torch and transformers are imported; float options must be finite (a NaN ratio or learning rate would pass
    every range check)."""
    if isinstance(arguments.get("model"), str):
        from .source.locate import resolve_model

        resolve_model(arguments["model"])
    if any(isinstance(value, float) for value in arguments.values()):  # finite imports torch: not for `methods`
        from .finite import require_finite_numbers

        require_finite_numbers((param(name), value) for name, value in arguments.items())


def writable_file(path: Path | None, parameter: str) -> None:
    """Fail before any work if `path` (the value of `parameter`) cannot be written later (a directory,
    a missing or read-only parent)."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OptionError(parameter, f"{path} is a directory; give a file name.")
    if not parent.is_dir():
        raise OptionError(parameter, f"{path}: directory {parent} does not exist; create it or choose another path.")
    if not os.access(parent, os.W_OK):
        raise OptionError(parameter, f"{path}: directory {parent} is not writable; choose another path.")


def directory_option(path: Path | None, parameter: str = "cache_dir") -> None:
    """A directory option (created if missing) must not name an existing file."""
    if path is not None and path.exists() and not path.is_dir():
        raise OptionError(parameter, f"{path} is a file, not a directory; pass a directory (it is created if missing).")
