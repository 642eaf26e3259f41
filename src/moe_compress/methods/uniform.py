"""`--uniform`: round a global budget's plan to the best plan that keeps the same count in every layer.

Why. A global budget lets layers keep different numbers of experts, so its output needs our
generated modelling code (`trust_remote_code`), which serving engines do not load. A plan that
keeps the same count everywhere is a stock checkpoint. `--uniform` gives the global plan's
total to every MoE layer in equal shares and reports what that rounding costs.

The count. The global plan keeps T experts over L MoE layers; each layer of the uniform plan
keeps round(T / L) (halves round up). Group-limited routers (DeepSeek-V3, GLM) count in units
of one expert per routing group, so the count is G * round(T / (G * L)) and every group keeps
the same share. Every layer of the global plan keeps at least what its router needs (top-k,
`min_per_group` per group), so their mean, and its rounding, does too. Layers must all hold the
same number of experts, or "the same count" would remove different shares.

Which experts. The uniform plan is the method's own *layer* budget at the ratio that removes
E - count experts per layer, planned from the same statistics; the super-expert guard then
repairs it as any plan. For the score-based criteria (frequency, soft_count, gate_sum, ean,
reap) that is exactly "the top count of every layer by the global plan's scores": a global
budget compares each layer's scores divided by their sum (or raw), a positive per-layer
factor that never changes the order within a layer, so the best `count` experts of a layer
under the global scores are its best `count` under its own scores -- the layer budget's choice.
For the merging methods (hc-smoe, m-smoe, ream) and C-Prune the layer budget is likewise their
own per-layer rule at that count, and its output is stock. MoNE is refused: its novice vectors
replace removed experts through router rows that stay, which always needs generated code, so a
"uniform MoNE" would not be serveable; prune with a score-based method instead.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..errors import MoECompressError, param
from ..arch.size import model_size
from ..plan import Plan
from ..surgery.experts import apply_plan
from .registry import Method, PlanRequest

UNIFORM = param("uniform")
#: Methods whose output is never a stock checkpoint, whatever the counts.
NEVER_STOCK = {"mone": "its novice vectors keep removed experts' router rows, which needs generated code whatever the counts"}


def check_uniform(method: str, budget: str, planned: bool = False) -> None:
    """Refuse `--uniform` where it cannot give a stock checkpoint from a global plan."""
    if planned:
        raise MoECompressError(f"{UNIFORM} rounds the plan a method makes; a {param('plan_in')} plan is applied as it is: drop {UNIFORM}.")
    if budget != "global":
        raise MoECompressError(f"{UNIFORM} rounds a global budget's plan to equal per-layer counts: add {param('budget')} global (a {budget} budget is uniform already).")
    if method in NEVER_STOCK:
        raise MoECompressError(f"{UNIFORM} gives a stock checkpoint, which {method} cannot: {NEVER_STOCK[method]}; use a score-based method such as reap.")


def kept_per_layer(plan: Plan) -> dict[int, int]:
    """Experts (or merge groups) each MoE layer of a plan keeps."""
    return {lp.layer: len(lp.keep) for lp in plan.layers if lp.action != "drop_moe"}


def uniform_count(plan: Plan) -> int:
    """The count every layer keeps when the plan's total is shared equally (in whole routing-group units)."""
    experts = {lp.num_experts for lp in plan.layers if lp.action != "drop_moe"}
    if len(experts) != 1:
        raise MoECompressError(f"{UNIFORM} needs every MoE layer to hold the same number of experts; this model's hold {sorted(experts)}.")
    kept = kept_per_layer(plan)
    units = sum(kept.values()) / plan.routing_groups / len(kept)
    return plan.routing_groups * math.floor(units + 0.5)


def uniform_plan(method: Method, request: PlanRequest, options: dict[str, Any] | None, global_plan: Plan) -> Plan:
    """The method's layer-budget plan keeping `uniform_count(global_plan)` experts in every layer."""
    experts = global_plan.layers[0].num_experts
    count = uniform_count(global_plan)
    plan = method.make_plan(replace(request, ratio=(experts - count) / experts, budget="layer"), options)
    plan.meta["uniform"] = {"from_budget": "global", "from_ratio": request.ratio, "kept_per_layer": count}
    return plan


def meta_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The model's structure with every parameter and buffer on the meta device: no weight is copied."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad) for p in model.parameters()}
    memo |= {id(b): torch.empty_like(b, device="meta") for b in model.buffers()}
    return copy.deepcopy(model, memo)


def plan_outcome(model: PreTrainedModel, adapter: MoEAdapter, plan: Plan) -> dict:
    """What a plan keeps and the size it gives, from a meta copy of the (unchanged) model."""
    shaped = meta_copy(model)
    apply_plan(shaped, plan, adapter)
    size = model_size(shaped, adapter)
    return {
        "kept_per_layer": {str(layer): n for layer, n in kept_per_layer(plan).items()},
        "kept_total": sum(kept_per_layer(plan).values()),
        "params_after": size.total,
        "active_params_after": size.active_per_token,
        "bytes_after": size.bytes,
    }
