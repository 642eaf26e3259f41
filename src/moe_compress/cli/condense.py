"""`moe-compress condense`: CD-MoE."""

from pathlib import Path
from typing import Annotated

import typer

from ..errors import MoECompressError
from ..inputs import directory_option, require_positive, writable_file
from .common import show
from .options import CacheDirOpt, Calibration, DryRunOpt, Guard, Loading, ModelArg, OutOpt, OverwriteOpt, PlanOutOpt, command


@command("condense", exclude=("batch_size", "text_field", "streaming", "max_activation_memory", "offload_dir"))
def condense_command(
    model: ModelArg,
    out: OutOpt,
    layers: Annotated[int, typer.Option(help="How many MoE layers to condense (at least one must keep routing).")] = 1,
    experts: Annotated[int | None, typer.Option(help="Routed experts each condensed layer keeps, K (default: top-k, as the authors' 6 for DeepSeekMoE-16B); 0 keeps shared experts only (CD-MoE-S).")] = None,
    objective: Annotated[str, typer.Option(help="layer_output: the authors' JSD of the layer output, then of the final hidden state; next_token: JSD of the next-token distribution for both (moe-compress's earlier search).")] = "layer_output",
    choose_size: Annotated[bool, typer.Option("--choose-size", help="Keep the prefix of 1..K experts with the lowest divergence instead of exactly K.")] = False,
    position_stride: Annotated[int, typer.Option(help="next_token objective: score every k-th position only.")] = 1,
    state_file: Annotated[Path | None, typer.Option(help="Where the search saves its progress and resumes from (default: under the cache directory, keyed by model, data and settings).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard a saved search state and search again.")] = False,
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
    from ..dry_run import dry_run_condense
    from ..source.load import resolve_model
    from ..source.open import available_bytes
    from ..sink.save import check_output_dir
    from ..loading import load_whole
    from ..preflight import check_condense, check_condense_memory, skeleton
    from ..report.compression import compression_report, search_line
    from ..evaluate.guard import guard_line
    from ..stages.condense import condense

    require_positive(layers=layers, position_stride=position_stride)
    if experts is not None and experts < 0:
        raise MoECompressError(f"--experts must be 0 (shared experts only) or more; got {experts}.")
    spec = calibration.spec()
    writable_file(plan_out, "--plan-out")
    directory_option(cache_dir)
    load.check(model)
    if dry_run:
        return dry_run_condense(model, out, overwrite, layers, experts, choose_size, spec, load.dtype, load.trust_remote_code)
    check_condense(skeleton(model, load.dtype, load.trust_remote_code), layers, experts)  # from the config and shard headers: no weight read yet
    check_output_dir(out, overwrite, [model])
    if Path(resolve_model(model)).is_dir():
        check_condense_memory(Path(resolve_model(model)), samples, spec.seq_len, available_bytes("cpu"))
    with load.session():
        loaded, tokenizer = load_whole(model, dtype=load.dtype, device=load.device, trust_remote_code=load.trust_remote_code)
        result = condense(loaded, layers, experts, objective, choose_size, position_stride, spec, tokenizer, out, overwrite, cache_dir,
                          load.device, state_file=state_file, fresh=fresh)
        request = guard.request("condense", spec)
        checked = None if request is None else request.check(model, out, load.device)
    show([search_line(result.plan.meta), *compression_report(result, "condensed", model, out, plan_out), guard_line(checked)])
