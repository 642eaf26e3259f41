"""`moe-compress slim`: weight sparsity inside the experts (Wanda, SparseGPT, magnitude)."""

from pathlib import Path
from typing import Annotated

import typer

from ..errors import MoECompressError
from .common import require_positive, show
from .options import Calibration, DryRunOpt, Evaluation, Loading, ModelArg, OverwriteOpt, command


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
    evaluation: Evaluation = Evaluation(),
    overwrite: OverwriteOpt = False,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Zero weights inside the experts with Wanda, SparseGPT or magnitude pruning (unstructured or N:M) and save the result."""
    from ..evaluate.compression import eval_sets, perplexities, perplexities_after
    from ..io.save import check_output_dir
    from ..preflight import Structure, check_slim
    from ..report.compression import sparsity_report
    from ..slimming import SLIM_METHODS, make_spec
    from ..slimming import slim as slim_model
    from ..slimming.observe import check_targets

    if method not in SLIM_METHODS:
        raise MoECompressError(f"unknown slimming method {method!r}; choose one of {', '.join(SLIM_METHODS)}.")
    spec = make_spec(sparsity, nm)  # bad --sparsity / --nm fail before anything is loaded
    chosen = check_targets(targets)
    require_positive(blocksize=blocksize)
    protocol, calib = evaluation.protocol(), calibration.spec()
    load.check(model)
    if dry_run:
        from ..dry_run import dry_run_slim

        dry_run_slim(model, out, overwrite, method, spec, chosen, calib, evaluation.eval_ppl, protocol, load.dtype, load.trust_remote_code)
        return
    check_output_dir(out, overwrite, [model])
    with load.session(load.device) as device:
        loaded, tokenizer, weights = load.open(model, device)
        check_slim(Structure.of(loaded), chosen)  # e.g. shared experts asked of a model without any: now, not after evaluating
        windows = eval_sets(protocol, evaluation.eval_ppl, tokenizer, loaded.config)
        before = perplexities(loaded, windows, weights, device, "before")
        result = slim_model(
            weights if weights.streamed else loaded, method, sparsity=None if spec.nm else spec.fraction, nm=spec.nm, calib=calib,
            targets=chosen, tokenizer=tokenizer, out=out, overwrite=overwrite, blocksize=blocksize, damp=damp, propagate=propagate,
            device=device,
        )
        if result.output_dir is None:  # a rank other than 0 of a distributed run: rank 0 reports
            return
        after = perplexities_after(result, windows, device)
    show(sparsity_report(result, method, chosen, model, out, protocol, before, after))
