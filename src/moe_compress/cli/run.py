"""`moe-compress run`: a recipe's stages in order."""

from pathlib import Path
from typing import Annotated

import typer

from ..progress import say, show
from .options import DryRunOpt, command


@command("run")
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: model, calibration, evaluate, stages (prune, drop, condense, finetune, slim, and quantize as the last), out. Examples in recipes/.")],
    out: Annotated[Path | None, typer.Option(help="Output directory (overrides the recipe's 'out').")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it exists.")] = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Run a recipe: compression stages in order on one model, with a report after every stage.

    Every stage's options are checked against the model's structure before calibration starts.
    A recipe lets its model's own Python code run only with a top-level `trust_remote_code: true`.
    """
    from ..recipes import describe_recipe, report_blocks, run_recipe

    if dry_run:
        for line in describe_recipe(recipe, out, overwrite):
            say(line)
        return
    show(report_blocks(run_recipe(recipe, out, overwrite)))
