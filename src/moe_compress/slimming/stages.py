"""The `slim` recipe stage: weight sparsity on the current model with the recipe's calibration set.

    stages:
      - prune: {method: reap, ratio: 0.25}
      - slim: {method: sparsegpt, nm: "2:4", targets: [experts]}

Quantisation is not a stage: it writes a packed checkpoint rather than an in-memory model,
so it runs on a recipe's output (`moe-compress quantize OUT --bits 4`).
"""

from __future__ import annotations

from ..errors import MoECompressError
from ..recipes import StageContext, StageOutcome, register_stage
from .apply import slim

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


register_stage("slim", slim_stage)
