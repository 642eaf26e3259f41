"""`moe-compress condense`: CD-MoE."""

from typing import Annotated

import typer

from ..stages.options import CondenseOptions
from .common import show
from .options import CacheDirOpt, Calibration, DryRunOpt, Guard, Loading, ModelArg, OutOpt, OverwriteOpt, PlanOutOpt, command, stage_options

Options = stage_options(CondenseOptions)


@command("condense", exclude=("batch_size", "text_field", "streaming", "max_activation_memory", "offload_dir"))
def condense_command(
    model: ModelArg,
    out: OutOpt,
    given: Options = Options(),
    samples: Annotated[int, typer.Option(help="Calibration sequences (the authors use 100).")] = 32,
    calibration: Calibration = Calibration(),
    guard: Guard = Guard(),
    plan_out: PlanOutOpt = None,
    overwrite: OverwriteOpt = False,
    cache_dir: CacheDirOpt = None,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """CD-MoE: condense MoE layers into shared experts + a few constant-weight experts, chosen by output divergence.

    Memory: unlike prune, drop, slim and quantize, condense does not stream. Its search reruns
    every later layer for each candidate, so it holds the whole model plus every decoder
    layer's input for the calibration tokens (layers x samples x seq-len x hidden, in the model
    dtype); it refuses to start when that exceeds the available memory.
    """
    from ..stage_command import run_stage

    show(run_stage(given.stage(), model, out, calibration.spec(), load, guard, overwrite=overwrite, plan_out=plan_out, cache_dir=cache_dir,
                   dry_run=dry_run))
