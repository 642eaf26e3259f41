"""`moe-compress slim`: weight sparsity inside the experts (Wanda, SparseGPT, magnitude)."""

from pathlib import Path
from typing import Annotated

import typer

from ..stages.options import SlimOptions
from .common import show
from .options import Calibration, DryRunOpt, Evaluation, Guard, Loading, ModelArg, OverwriteOpt, command, stage_options

Options = stage_options(SlimOptions)


@command()
def slim(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the sparsified checkpoint to (written atomically; same shapes, zeros where weights were removed).")],
    given: Options = Options(),
    calibration: Calibration = Calibration(),
    evaluation: Evaluation = Evaluation(),
    guard: Guard = Guard(),
    overwrite: OverwriteOpt = False,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Zero weights inside the experts with Wanda, SparseGPT or magnitude pruning (unstructured or N:M) and save the result."""
    from ..stage_command import run_stage

    show(run_stage(given.stage(), model, out, calibration.spec(), load, guard, evaluation, overwrite=overwrite, dry_run=dry_run))
