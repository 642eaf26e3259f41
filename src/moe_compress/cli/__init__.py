"""The `moe-compress` command line: one module per command, each a thin wrapper over the library.

Top-level imports stay light (typer, rich): `moe-compress --help` must not import torch.
Each command imports what it needs when it runs.
"""

import os
import sys
from typing import Annotated

import typer

from .. import __version__
from ..progress import results, say
from .common import app

def _print_version(value: bool) -> None:
    if value:
        say(f"moe-compress {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but results, warnings and errors (no progress). Also accepted after the command.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show the libraries' own logs, progress bars and warnings (silenced by default). Also accepted after the command.")] = False,
) -> None:
    """Compress Mixture-of-Experts language models and save checkpoints that load anywhere."""


# Each module registers its command on `app`, in the order `--help` lists them.
from . import inspect, prune, eval, drop, condense, finetune, run, families, methods, analyze, slim, quantize, fit  # noqa: E402, F401, I001


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for all
        os.environ["MOE_COMPRESS_QUIET"] = "1"
        results.quiet = True
    sys.exit(app())
