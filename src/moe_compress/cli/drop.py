"""`moe-compress drop`: layer drop / block drop."""

from ..stages.options import DropOptions
from .common import show
from .options import Calibration, DryRunOpt, Guard, Loading, ModelArg, OutOpt, OverwriteOpt, PlanOutOpt, command, stage_options

Options = stage_options(DropOptions, flags={"n": "--drop"})


@command("drop", exclude=("batch_size", "text_field"), samples=128)
def drop_command(
    model: ModelArg,
    out: OutOpt,
    given: Options = Options(),
    calibration: Calibration = Calibration(),
    guard: Guard = Guard(),
    plan_out: PlanOutOpt = None,
    overwrite: OverwriteOpt = False,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Layer drop / block drop: remove the MoE sub-layers or blocks that change the residual stream least."""
    from ..stage_command import run_stage

    show(run_stage(given.stage(), model, out, calibration.spec(), load, guard, overwrite=overwrite, plan_out=plan_out, dry_run=dry_run))
