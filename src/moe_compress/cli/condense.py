"""`moe-compress condense`: CD-MoE."""

from pathlib import Path
from typing import Annotated

import typer

from ..errors import MoECompressError
from ..inputs import directory_option, require_positive, writable_file
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
    from ..dry_run import dry_run_stages
    from ..source.load import resolve_model
    from ..source.open import available_bytes
    from ..sink.save import check_output_dir
    from ..loading import load_whole
    from ..preflight import check_condense_memory, skeleton
    from ..report.compression import compression_report, search_line
    from ..evaluate.guard import guard_line
    from ..stages.condense import condense

    require_positive(layers=given.layers, position_stride=given.position_stride)
    if given.experts is not None and given.experts < 0:
        raise MoECompressError(f"--experts must be 0 (shared experts only) or more; got {given.experts}.")
    spec, stage = calibration.spec(), given.stage()
    writable_file(plan_out, "--plan-out")
    directory_option(cache_dir)
    load.check(model)
    if dry_run:
        return dry_run_stages("condense", model, out, overwrite, [stage], load, spec)
    stage.check(skeleton(model, load.dtype, load.trust_remote_code), [])  # from the config and shard headers: no weight read yet
    check_output_dir(out, overwrite, [model])
    if Path(resolve_model(model)).is_dir():
        check_condense_memory(Path(resolve_model(model)), spec.samples, spec.seq_len, available_bytes("cpu"))
    with load.session():
        loaded, tokenizer = load_whole(model, dtype=load.dtype, device=load.device, trust_remote_code=load.trust_remote_code)
        result = condense(loaded, **stage.settings(), calib=spec, tokenizer=tokenizer, out=out, overwrite=overwrite, device=load.device)
        request = guard.request("condense", spec)
        checked = None if request is None else request.check(model, out, load.device)
    show([search_line(result.plan.meta), *compression_report(result, "condensed", model, out, plan_out), guard_line(checked)])
