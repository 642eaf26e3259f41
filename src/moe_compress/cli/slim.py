"""`moe-compress slim`: weight sparsity inside the experts (Wanda, SparseGPT, magnitude)."""

from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..inputs import require_positive
from .common import show
from .options import Calibration, DryRunOpt, Evaluation, Guard, Loading, ModelArg, OverwriteOpt, command


@command()
def slim(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the sparsified checkpoint to (written atomically; same shapes, zeros where weights were removed).")],
    method: Annotated[str, typer.Option(help="wanda (|W|*||X||, per output row), sparsegpt (second-order with weight updates) or magnitude (|W|, no calibration).")] = "wanda",
    sparsity: Annotated[float | None, typer.Option(help="Fraction of each output row's weights to zero, in [0, 1). Default 0.5 unless --nm is given.")] = None,
    nm: Annotated[str | None, typer.Option("--nm", help="Semi-structured N:M pattern instead of --sparsity, e.g. 2:4 or 4:8 (at most N nonzeros in every M consecutive input weights).")] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated weights to sparsify: experts (routed experts), shared (shared experts), attention.")] = "experts",
    calibration: Calibration = Calibration(),
    blocksize: Annotated[int, typer.Option(help="sparsegpt: columns per lazy-update block (mask chosen per block).")] = 128,
    damp: Annotated[float, typer.Option(help="sparsegpt: Hessian damping as a fraction of its mean diagonal.")] = 0.01,
    propagate: Annotated[bool, typer.Option("--propagate/--no-propagate", help="Feed each layer the outputs of the already pruned layers (SparseGPT's sequential scheme) or of the original ones.")] = True,
    calibrate_all_experts: Annotated[bool, typer.Option("--calibrate-all-experts", help="wanda/sparsegpt: route every calibration token to every routed expert while statistics are gathered (the model's output and routing stay its own), so no expert is pruned without data, as GPTQModel's routing override does; each expert's statistics then come from all tokens, not only its routed ones.")] = False,
    evaluation: Evaluation = Evaluation(),
    guard: Guard = Guard(),
    overwrite: OverwriteOpt = False,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Zero weights inside the experts with Wanda, SparseGPT or magnitude pruning (unstructured or N:M) and save the result."""
    from ..dry_run import dry_run_slim
    from ..preflight import check_slim
    from ..report.compression import sparsity_report
    from ..evaluate.guard import guard_line
    from ..single import run_single
    from ..slimming import make_spec
    from ..slimming.apply import check_method
    from ..slimming import slim as slim_model
    from ..slimming.observe import check_targets

    check_method(method)
    spec = make_spec(sparsity, nm)  # bad --sparsity / --nm fail before anything is loaded
    chosen = check_targets(targets)
    require_positive(blocksize=blocksize)
    protocol, calib = evaluation.protocol(), calibration.spec()
    load.check(model)
    if dry_run:
        return dry_run_slim(model, out, overwrite, method, spec, chosen, calib, evaluation.eval_ppl, protocol, load.dtype, load.trust_remote_code)
    stage = partial(slim_model, method=method, sparsity=None if spec.nm else spec.fraction, nm=spec.nm, calib=calib, targets=chosen,
                    out=out, overwrite=overwrite, blocksize=blocksize, damp=damp, propagate=propagate,
                    calibrate_all_experts=calibrate_all_experts)
    # e.g. shared experts asked of a model without any: fails once the model is open, not after evaluating
    run = run_single(stage, model, out, overwrite, load, lambda structure: check_slim(structure, chosen), evaluation.eval_ppl, protocol,
                     guard=guard.request("slim", calib))
    if run is not None:  # None: a rank other than 0 of a distributed run; rank 0 reports
        show([*sparsity_report(run.result, method, chosen, model, out, protocol, run.before, run.after), guard_line(run.guard)])
