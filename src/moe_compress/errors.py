"""User-facing errors and warnings.

Everything that a user can cause (a bad path, a model we do not support, an impossible ratio)
raises `MoECompressError` with a message that names the problem and the fix. The CLI prints
these without a traceback; anything else is a bug and keeps its traceback.

Warnings are for what a run can survive (an unusable statistics cache, a plan applied
unchecked with ignore_plan_identity): one line on stderr, and the run goes on.

A message names a parameter of the caller's as `param("ratio")`, never as a CLI flag: a Python
caller reads the API name ("ratio must be in [0, 1)"), and the CLI, which knows its command's
options, names the flag the user typed ("--ratio must be in [0, 1)") through `parameter_names`.
`OptionError` is the error about one such parameter's value.
"""

from __future__ import annotations

import errno
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: OS errors that are about the user's paths or machine, not bugs.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOENT}


#: Brackets a parameter's name inside a message until it is shown (a control character no
#: value a user gives contains, so interpolated paths and texts are never taken for a name).
_MARK = "\x1f"
_MARKED = re.compile(f"{_MARK}([^{_MARK}]*){_MARK}")
#: How parameters are named in messages shown now: their API names unless a caller (the CLI) says.
_names: ContextVar[Callable[[str], str]] = ContextVar("parameter_names", default=lambda name: name)


def param(name: str) -> str:
    """The parameter `name` (its API name) inside a message, shown as whoever reads the message calls it."""
    return f"{_MARK}{name}{_MARK}"


def named(text: str) -> str:
    """`text` with each `param` in it named as the current reader calls it (see `parameter_names`)."""
    return _MARKED.sub(lambda match: _names.get()(match[1]), text)


@contextmanager
def parameter_names(name_of: Callable[[str], str]) -> Iterator[None]:
    """Within this block, messages name each parameter as `name_of(api_name)` (the CLI: its flag)."""
    token = _names.set(name_of)
    try:
        yield
    finally:
        _names.reset(token)


class MoECompressError(Exception):
    """An error caused by the user's input, with a message that says how to fix it. The message
    may name parameters with `param`; `str()` names them as the current reader calls them."""

    def __str__(self) -> str:
        return named(super().__str__())


class OptionError(MoECompressError):
    """A bad value of one parameter: `parameter` is its API name, `problem` the rest of the line
    (it may name other parameters with `param`, e.g. the one to use instead)."""

    def __init__(self, parameter: str, problem: str):
        super().__init__(f"{param(parameter)} {problem}")
        self.parameter = parameter
        self.problem = problem

    def __reduce__(self):  # rebuilt from both fields (Exception's default passes only the message)
        return type(self), (self.parameter, self.problem)


class QualityGuardError(MoECompressError):
    """A stage's output failed the quality guard (`evaluate.guard`): the message names the check,
    its threshold, the worst layer and the override; `report` holds what was measured, so a caller
    can still record it (in the summary, the card) before exiting."""

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report


def warn(message: str) -> None:
    """One `warning:` line on stderr (not Python's warnings module: its two-line format with a
    source location means nothing to a CLI user)."""
    print(f"warning: {named(message)}", file=sys.stderr, flush=True)


def require_positive(**options: int | None) -> None:
    """Each given option (None: not given) must be an integer >= 1."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise OptionError(name, f"must be a positive integer; got {value}.")


def user_message(exc: BaseException) -> str | None:
    """The one line for an error the user caused: a `MoECompressError`'s message, or for an OS error the user can fix
    (no space, a read-only or missing path) what happened to which path; None for any other error (a bug)."""
    if isinstance(exc, MoECompressError):
        return str(exc)
    if not isinstance(exc, OSError) or exc.errno not in _USER_OS_ERRORS:
        return None
    return f"{exc.strerror}: {exc.filename or ''}".rstrip(": ") + "; check the path, its permissions and free space."
