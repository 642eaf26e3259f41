"""What every command shares: user errors as one line and exit 2, the small checks of option values
that need no model, and printing the blocks (tables, result lines) the library returns."""

import errno
import os
import sys
from collections.abc import Callable, Iterable
from functools import wraps
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from .. import progress
from ..errors import MoECompressError

console = progress.messages  # stderr: progress, notes, warnings, errors; one error line stays one line when piped
out_console = progress.results  # stdout: results; never wrapped when not a terminal
say = progress.say

#: Flags that set the verbosity; accepted before or after the command name.
_VERBOSITY_FLAGS = {"--quiet": "quiet", "-q": "quiet", "--verbose": "verbose", "-v": "verbose"}


def _verbosity_from(args: list[str]) -> tuple[list[str], progress.Verbosity | None]:
    """Take the verbosity flags out of `args` wherever they are (`moe-compress prune ... --quiet`
    reads as naturally as `moe-compress --quiet prune ...`); the last one given wins."""
    level = None
    rest = []
    for position, arg in enumerate(args):
        if arg == "--":  # everything after it is an argument, never a flag
            rest += args[position:]
            break
        if arg in _VERBOSITY_FLAGS:
            level = _VERBOSITY_FLAGS[arg]
        else:
            rest.append(arg)
    return rest, level


class _OneLineUsageErrors(TyperGroup):
    """A bad option value or a missing argument is a user error like any other: one
    `error:` line and exit 2, not click's usage box. Also sets the verbosity for the command,
    silences library noise unless verbose, and records the command line for model cards."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from ..invocation import recording

        args, level = _verbosity_from(list(sys.argv[1:] if args is None else args))
        no_arguments = not args  # shows the help, as no_args_is_help says
        if not standalone_mode or no_arguments:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        previous = progress.set_verbosity(level) if level else None
        try:
            with progress.libraries_quiet(), recording(["moe-compress", *args]):
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's click: bad values, unknown options, missing arguments
            where = getattr(exc, "ctx", None)
            error_line(exc.format_message().rstrip(".") + (f"; see `{where.command_path} --help`." if where else "."))
            sys.exit(2)
        except typer.Abort:
            error_line("aborted.")
            sys.exit(1)
        finally:
            if level:
                progress.set_verbosity(previous)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    help="Compress Mixture-of-Experts language models and save checkpoints that load anywhere.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_OneLineUsageErrors,
)


#: OS errors that are about the user's paths or machine, not bugs: one line, exit 2.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOENT}


def error_line(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")


def user_errors(command: Callable) -> Callable:
    """Print user errors as one clear line and exit 2, instead of a traceback.

    Float options must be finite (a NaN ratio or learning rate would pass every range check);
    output locks are released when the command ends, however it ends. A model that cannot be
    found is answered first, before torch and transformers are imported.
    """
    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            if isinstance(kwargs.get("model"), str):
                from ..io.locate import resolve_model

                resolve_model(kwargs["model"])
            from ..io.output_lock import output_locks

            if any(isinstance(value, float) for value in kwargs.values()):  # finite imports torch: not for `methods`
                from ..finite import require_finite_numbers

                require_finite_numbers((f"--{name.replace('_', '-')}", value) for name, value in kwargs.items())
            with output_locks():
                return command(*args, **kwargs)
        except MoECompressError as exc:
            error_line(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in _USER_OS_ERRORS:
                raise
            error_line(f"{exc.strerror}: {exc.filename or ''}".rstrip(": ") + "; check the path, its permissions and free space.")
            raise typer.Exit(2) from None

    return wrapper


def require_positive(**options: int | None) -> None:
    """Each given option (None: not given) must be an integer >= 1."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise MoECompressError(f"--{name.replace('_', '-')} must be a positive integer; got {value}.")


def writable_file(path: Path | None, option: str) -> None:
    """Fail before any work if `path` cannot be written later (a directory, a missing or read-only parent)."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise MoECompressError(f"{option} {path} is a directory; give a file name.")
    if not parent.is_dir():
        raise MoECompressError(f"{option} {path}: directory {parent} does not exist; create it or choose another path.")
    if not os.access(parent, os.W_OK):
        raise MoECompressError(f"{option} {path}: directory {parent} is not writable; choose another path.")


def directory_option(path: Path | None, option: str = "--cache-dir") -> None:
    """A directory option (created if missing) must not name an existing file."""
    if path is not None and path.exists() and not path.is_dir():
        raise MoECompressError(f"{option} {path} is a file, not a directory; pass a directory (it is created if missing).")


def load_whole(model: str, **kwargs):
    """`io.load.load_model` (the whole model in memory) with a progress line."""
    from ..io.load import load_model

    with progress.step(f"loading {model}"):
        return load_model(model, **kwargs)


def show(blocks: Iterable[Table | str]) -> None:
    """Print what the library reports: tables with their title on a line of their own, result lines as they are
    (lines that qualify the results are part of them: stdout, never a table caption); empty lines are skipped."""
    for block in blocks:
        if isinstance(block, Table):
            progress.show_table(block)
        elif block:
            say(block)
