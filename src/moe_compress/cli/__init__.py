"""The `moe-compress` command line: one module per command, each a thin wrapper over the library.

Top-level imports stay light (typer, rich): `moe-compress --help` must not import torch.
Each command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__, progress
from .common import error_line, out_console

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


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"moe-compress {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but results, warnings and errors (no progress). Also accepted after the command.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show the libraries' own logs, progress bars and warnings (silenced by default). Also accepted after the command.")] = False,
) -> None:
    """Compress Mixture-of-Experts language models and save checkpoints that load anywhere."""


# Each module registers its command on `app`, in the order `--help` lists them.
from . import inspect, prune, eval, drop, condense, finetune, run, families, methods, analyze, slim, quantize  # noqa: E402, F401, I001


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for all
        os.environ["MOE_COMPRESS_QUIET"] = "1"
        out_console.quiet = True
    sys.exit(app())
