"""The tail every structural stage shares: apply the plan, summarise what changed, save if asked."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import distributed
from ..arch.size import model_size
from ..sink.export import carried_keys, keeps_stored_format, raw_groups, streamed_groups
from ..source.residency import Weights
from ..sink.save import save_with_summary
from ..methods.uniform import plan_outcome
from ..plan import Plan
from ..surgery.experts import apply_layer_plan, apply_plan
from ..evaluate.speed import peak_rss_bytes


@dataclass
class CompressionResult:
    """What a compression call produced. `model` is None after a streamed run: the result is `output_dir`."""

    model: PreTrainedModel | None
    plan: Plan | None  # None on ranks other than 0 of a distributed run
    summary: dict = field(default_factory=dict)
    output_dir: Path | None = None
    #: With `uniform=True`: the global plan that `plan` was rounded from (never applied).
    global_plan: Plan | None = None


def other_rank_result() -> CompressionResult:
    """What a rank other than 0 returns: it helped calibrate; rank 0 plans and writes (then all meet at a barrier)."""
    distributed.barrier()
    return CompressionResult(None, None, {"rank": distributed.rank()}, None)


def apply_and_report(
    model: PreTrainedModel,
    adapter,
    plan: Plan,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | Path | None,
    overwrite: bool,
    start: float,
    before,
    from_cache: bool,
    weights: Weights,
    global_plan: Plan | None = None,
) -> CompressionResult:
    """Apply `plan`, summarise what changed, and save if asked: the tail every stage shares.

    Streamed, the plan is applied to a copy of the (meta) skeleton, which describes the
    output's structure and config, while the writer applies it to each layer read from disk.
    A `global_plan` that `plan` was rounded from is summarised beside it, never applied.
    Under torchrun only rank 0 gets past this point's first line; the others wait for it.
    """
    if not distributed.is_main():
        return other_rank_result()
    groups = None
    carried = carried_keys(model, weights)
    outcomes = {"global": plan_outcome(model, adapter, global_plan), "uniform": plan_outcome(model, adapter, plan)} if global_plan else None
    if weights.streamed:
        model = copy.deepcopy(model)
    else:
        weights.checkpoint = None  # changed in place below: no longer the checkpoint's content
    apply_plan(model, plan, adapter)
    stored_format = "as loaded"
    if weights.streamed:
        groups = streamed_groups(weights, adapter, plan, apply_layer_plan)
        if weights.quantization is not None:
            method = weights.quantization.config.get("quant_method")
            if keeps_stored_format(plan, model):
                groups = raw_groups(weights, adapter, plan)
                model.config.quantization_config = weights.quantization.config
                stored_format = f"{method}, as stored (experts sliced with their scales)"
            else:
                stored_format = f"{model.dtype} (dequantised: a {method} checkpoint keeps its format only under plans that keep or remove whole experts and blocks into a stock checkpoint)"
    summary = outcome_summary(model, adapter, plan, before, from_cache, weights.streamed, len(carried), stored_format, start)
    if outcomes:
        summary["uniform"] = outcomes
    output_dir = save_with_summary(model, out, tokenizer, plan, summary, overwrite, groups)
    distributed.barrier()
    return CompressionResult(None if weights.streamed else model, plan, summary, output_dir, global_plan)


def outcome_summary(output, adapter, plan: Plan, before, from_cache: bool, streamed: bool, carried: int, stored_format: str, start: float) -> dict:
    """What a structural stage reports of `output`, the model `plan` was applied to (or its skeleton)."""
    after = model_size(output, adapter)
    return {
        "method": plan.method,
        "ratio": plan.ratio,
        "budget": plan.budget,
        "experts_per_layer": {str(k): v for k, v in after.experts_per_layer.items()},
        "params_before": before.total,
        "params_after": after.total,
        "active_params_before": before.active_per_token,
        "active_params_after": after.active_per_token,
        "bytes_before": before.bytes,
        "bytes_after": after.bytes,
        "statistics_from_cache": from_cache,
        "streamed": streamed,
        # checkpoint tensors transformers does not load (e.g. multi-token-prediction layers), carried into the output
        "carried_tensors": carried,
        "weights_format": stored_format,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
