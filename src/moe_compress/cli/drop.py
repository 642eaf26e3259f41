"""`moe-compress drop`: layer drop / block drop."""

from functools import partial

from ..errors import MoECompressError
from ..inputs import writable_file
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
    from ..dry_run import dry_run_stages
    from ..report.compression import compression_report
    from ..evaluate.guard import guard_line
    from ..single import run_single
    from ..stages.drop import MODES, UNITS
    from ..stages.drop import drop as drop_layers

    if given.unit not in UNITS or given.mode not in MODES:
        raise MoECompressError(f"--unit must be one of {', '.join(UNITS)} and --mode one of {', '.join(MODES)}; got --unit {given.unit} --mode {given.mode}.")
    spec, stage = calibration.spec(), given.stage()
    writable_file(plan_out, "--plan-out")
    load.check(model)
    if dry_run:
        return dry_run_stages("drop", model, out, overwrite, [stage], load, spec)
    run = run_single(partial(drop_layers, **stage.settings(), calib=spec, out=out, overwrite=overwrite), model, out, overwrite, load,
                     lambda structure: stage.check(structure, []), guard=guard.request("drop", spec))
    if run is not None:  # None: a rank other than 0 of a distributed run; rank 0 reports
        show([*compression_report(run.result, "dropped", model, out, plan_out), guard_line(run.guard)])
