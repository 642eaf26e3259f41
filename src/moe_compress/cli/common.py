"""What every command shares: user errors as one line and exit 2 (the library's parameters named by the
command's flags), and the verbosity flags anywhere on the line."""

import re
import sys
from collections.abc import Callable
from contextvars import ContextVar
from functools import wraps

import typer
from rich.markup import escape
from typer.core import TyperGroup

from .. import progress
from ..errors import MoECompressError, parameter_names, user_message
from ..inputs import check_arguments

#: The command being run (its options name the library's parameters in messages: `flag_of`).
_running: ContextVar[object | None] = ContextVar("running_command", default=None)


class _OneLineUsageErrors(TyperGroup):
    """A bad option value or a missing argument is a user error like any other: one
    `error:` line and exit 2, not click's usage box. Also sets the verbosity for the command,
    silences library noise unless verbose, and records the command line for model cards."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from ..invocation import recording

        args, level = progress.verbosity_from(list(sys.argv[1:] if args is None else args))
        if not standalone_mode or not args:  # no arguments: the help, as no_args_is_help says
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        with progress.verbosity_set(level):
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
        sys.exit(result if isinstance(result, int) else 0)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        _running.set(command)
        return name, command, rest


app = typer.Typer(  # its help: the docstring of the main options' callback (`cli/__init__.py`)
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_OneLineUsageErrors,
)


def error_line(message: str) -> None:
    """One `error:` line on stderr (`progress.messages`: it stays one line when piped)."""
    progress.messages.print(f"[bold red]error:[/] {escape(message)}")


#: A parameter name that reads as a flag where the command has no option of that name.
_PLAIN_NAME = re.compile(r"[a-z][a-z0-9_]*")
#: Library parameters whose name is not the Python name of the command's option, with the names
#: they may go by (the first the command has wins): the evaluation protocol is `--eval-windows` /
#: `--eval-seq-len` beside a calibration `--seq-len`, and `eval`'s own `--max-windows` / `--seq-len`.
#: Every other option is named as the library's parameter (`similarity_layers`: `--similarity-layer`).
_OPTION_NAMES = {"protocol.windows": ("eval_windows", "max_windows"), "protocol.seq_len": ("eval_seq_len", "seq_len")}


def flag_of(parameter: str) -> str:
    """The running command's flag for the library's `parameter` (`plan_out` -> `--plan-out`,
    `eval_ppl` -> `--eval`, `speed.batch` -> `--speed-batch`). A plain name the command has no
    option for reads as a flag too (`run`'s recipe stages: "--uniform rounds ...", as every command
    words it); any other name is shown as it is (`calibration.seq_len`, a flag a command passes)."""
    command = _running.get()
    options = {p.name: p for p in getattr(command, "params", ()) if p.param_type_name == "option"}
    for name in (parameter, parameter.replace(".", "_"), *_OPTION_NAMES.get(parameter, ())):
        if name in options:
            return next((o for o in options[name].opts if o.startswith("--")), options[name].opts[0])
    return "--" + parameter.replace("_", "-") if _PLAIN_NAME.fullmatch(parameter) else parameter


def user_errors(command: Callable) -> Callable:
    """Print user errors as one clear line and exit 2, instead of a traceback; output locks are
    released when the command ends, however it ends. Messages (warnings too) name the library's
    parameters by this command's flags."""
    @wraps(command)
    def wrapper(**arguments):
        from ..sink.output_lock import output_locks

        with parameter_names(flag_of):
            try:
                check_arguments(arguments)
                with output_locks():
                    return command(**arguments)
            except (MoECompressError, OSError) as exc:
                line = user_message(exc)
                if line is None:
                    raise
                error_line(line)
                raise typer.Exit(2) from None

    return wrapper
