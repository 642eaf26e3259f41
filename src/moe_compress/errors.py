"""User-facing errors and warnings.

Everything that a user can cause (a bad path, a model we do not support, an impossible ratio)
raises `MoECompressError` with a message that names the problem and the fix. The CLI prints
these without a traceback; anything else is a bug and keeps its traceback.

Warnings are for what a run can survive (an unusable statistics cache, a plan applied
unchecked with --ignore-plan-identity): one line on stderr, and the run goes on.
"""

from __future__ import annotations

import errno
import sys

#: OS errors that are about the user's paths or machine, not bugs.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOENT}


class MoECompressError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""


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
    print(f"warning: {message}", file=sys.stderr, flush=True)


def user_os_error(exc: OSError) -> str | None:
    """One line for an OS error the user can fix (no space, a read-only or missing path); None for any other (a bug)."""
    if exc.errno not in _USER_OS_ERRORS:
        return None
    return f"{exc.strerror}: {exc.filename or ''}".rstrip(": ") + "; check the path, its permissions and free space."
