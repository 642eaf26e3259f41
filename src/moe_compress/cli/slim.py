"""`moe-compress slim`: weight sparsity inside the experts (Wanda, SparseGPT, magnitude)."""

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..inputs import require_positive
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
    from ..dry_run import dry_run_stages
    from ..report.compression import sparsity_report
    from ..evaluate.guard import guard_line
    from ..single import run_single
    from ..slimming import make_spec
    from ..slimming.apply import check_method
    from ..slimming import slim as slim_model
    from ..slimming.observe import check_targets

    check_method(given.method)
    make_spec(given.sparsity, given.nm)  # bad --sparsity / --nm fail before anything is loaded
    chosen = check_targets(given.targets)
    require_positive(blocksize=given.blocksize)
    protocol, calib, stage = evaluation.protocol(), calibration.spec(), given.stage()
    load.check(model)
    if dry_run:
        return dry_run_stages("slim", model, out, overwrite, [stage], load, calib, evaluation.eval_ppl, protocol)
    # e.g. shared experts asked of a model without any: fails once the model is open, not after evaluating
    run = run_single(partial(slim_model, **stage.settings(), calib=calib, out=out, overwrite=overwrite), model, out, overwrite, load,
                     lambda structure: stage.check(structure, []), evaluation.eval_ppl, protocol, guard=guard.request("slim", calib))
    if run is not None:  # None: a rank other than 0 of a distributed run; rank 0 reports
        show([*sparsity_report(run.result, given.method, chosen, model, out, protocol, run.before, run.after), guard_line(run.guard)])
