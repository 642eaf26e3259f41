"""The `slim` and `quantize` recipe stages.

    stages:
      - prune: {method: reap, ratio: 0.25}
      - slim: {method: sparsegpt, nm: "2:4", targets: [experts]}
      - quantize: {bits: 4, group_size: 32}          # method: rtn (default) or autoround (uses the recipe's calibration set)

`slim` applies weight sparsity to the current model with the recipe's calibration set.
`quantize` is final: it writes the compressed-tensors checkpoint (which becomes the recipe's
output) and hands the next measurement that checkpoint reloaded, so the report's last row is
the quality of exactly what was saved.
"""

from __future__ import annotations

from ..arch.registry import get_adapter
from ..errors import MoECompressError
from ..evaluate.size import model_size
from ..recipes import StageContext, StageOutcome, register_stage
from .apply import slim
from .quantize import quantize

_QUANTIZE_OPTIONS = {"bits", "group_size", "scope", "symmetric", "method", "iters"}
_OPTIONS = {"method", "sparsity", "nm", "targets", "blocksize", "damp", "propagate"}


def slim_stage(ctx: StageContext, options: dict) -> StageOutcome:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise MoECompressError(f"slim stage: unknown options {sorted(unknown)}; known: {', '.join(sorted(_OPTIONS))}.")
    options = dict(options)
    targets = options.pop("targets", ("experts",))
    result = slim(ctx.model, calib=ctx.batches, tokenizer=ctx.tokenizer, device=ctx.device,
                  targets=tuple(targets) if isinstance(targets, list) else targets, **options)
    reached = {kind: round(row["sparsity"], 4) for kind, row in result.summary["reached"].items()}
    return StageOutcome(result.model, None, {"sparsity_reached": reached})


def quantize_stage(ctx: StageContext, options: dict) -> StageOutcome:
    from ..io.load import load_model

    unknown = set(options) - _QUANTIZE_OPTIONS
    if unknown:
        raise MoECompressError(f"quantize stage: unknown options {sorted(unknown)}; known: {', '.join(sorted(_QUANTIZE_OPTIONS))}.")
    size = model_size(ctx.model, get_adapter(ctx.model))
    result = quantize(ctx.model, ctx.scratch / "checkpoint", tokenizer=ctx.tokenizer, overwrite=True, calib=ctx.batches, device=ctx.device,
                      **options)
    reloaded, _ = load_model(result.output_dir, device=ctx.device)
    info = {key: result.summary[key] for key in ("method", "bits", "group_size", "scope", "quantized_params", "checkpoint_bytes")}
    # The reloaded model holds packed int32 weights, so counting it would misstate the model:
    # report the logical parameter counts and the bytes as stored (these override the measurement).
    info |= {"params": size.total, "active_params": size.active_per_token, "bytes": result.summary["checkpoint_bytes"]}
    return StageOutcome(reloaded, None, info, checkpoint=result.output_dir)


register_stage("slim", slim_stage, accepts=lambda: slim)
register_stage("quantize", quantize_stage, final=True, accepts=lambda: quantize)
