"""`moe-compress drop`: layer drop / block drop."""

from functools import partial
from typing import Annotated

import typer

from ..errors import MoECompressError
from ..inputs import writable_file
from .common import show
from .options import Calibration, DryRunOpt, Guard, Loading, ModelArg, OutOpt, OverwriteOpt, PlanOutOpt, command


@command("drop", exclude=("batch_size", "text_field"), samples=128)
def drop_command(
    model: ModelArg,
    out: OutOpt,
    unit: Annotated[str, typer.Option(help="moe: drop MoE sub-layers (attention stays); block: drop whole decoder layers.")] = "moe",
    drop: Annotated[int | None, typer.Option("--drop", help="How many sub-layers or blocks to drop.")] = None,
    target_ratio: Annotated[float | None, typer.Option(help="Instead of --drop: fraction of all parameters to remove, in (0, 1).")] = None,
    mode: Annotated[str, typer.Option(help="block only: discrete (most similar single blocks) or consecutive (best run).")] = "discrete",
    consecutive_score: Annotated[str, typer.Option(help="consecutive only: span scores a run of n blocks by cos(h_i, h_i+n); framework by cos(h_i, h_i+n+1), as the unified framework's code.")] = "span",
    calibration: Calibration = Calibration(),
    guard: Guard = Guard(),
    plan_out: PlanOutOpt = None,
    overwrite: OverwriteOpt = False,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Layer drop / block drop: remove the MoE sub-layers or blocks that change the residual stream least."""
    from ..dry_run import dry_run_drop
    from ..preflight import check_drop
    from ..report.compression import compression_report
    from ..evaluate.guard import guard_line
    from ..single import run_single
    from ..stages.drop import MODES, UNITS
    from ..stages.drop import drop as drop_layers

    if unit not in UNITS or mode not in MODES:
        raise MoECompressError(f"--unit must be one of {', '.join(UNITS)} and --mode one of {', '.join(MODES)}; got --unit {unit} --mode {mode}.")
    spec = calibration.spec()
    writable_file(plan_out, "--plan-out")
    load.check(model)
    if dry_run:
        return dry_run_drop(model, out, overwrite, unit, drop, target_ratio, mode, spec, load.dtype, load.trust_remote_code)
    stage = partial(drop_layers, unit=unit, n=drop, target_ratio=target_ratio, mode=mode, calib=spec, out=out, overwrite=overwrite,
                    consecutive_score=consecutive_score)
    run = run_single(stage, model, out, overwrite, load, lambda structure: check_drop(structure, unit, drop, target_ratio),
                     guard=guard.request("drop", spec))
    if run is not None:  # None: a rank other than 0 of a distributed run; rank 0 reports
        show([*compression_report(run.result, "dropped", model, out, plan_out), guard_line(run.guard)])
