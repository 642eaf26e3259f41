"""Layer drop and block drop: remove whole sub-layers or blocks that barely change the stream.

Scores come from `walk.similarity` on the unmodified model (one pass). The most similar
(least transforming) units are dropped first:
  * layer drop: MoE sub-layers with the highest S_l (their attention stays);
  * block drop, "discrete": the n blocks with the highest cos(h_i, h_{i+1});
  * block drop, "consecutive": the run of n blocks starting at argmax_i cos(h_i, h_{i+n}).
How many: `n` directly, or `target_ratio`, the fraction of all parameters to remove (units
are added in score order until their parameters reach the target; for "consecutive" the
smallest n whose best run reaches it).

Reference (DaizeDong/Unified-MoE-Compression, `prune/layer_drop.py`, `prune/block_drop.py`):
layer drop scores cos(h, h + MoE(norm(h))) over all tokens (`layer_drop_norm=True`, the
default) and drops the n highest; discrete block drop uses `similarities[:, 0]` = cos(h_i,
h_{i+1}) -- both exactly as here. Their consecutive mode reads `similarities[:, drop_n]`, which
is cos(h_i, h_{i+n+1}), yet drops the n blocks i..i+n-1. We score cos(h_i, h_{i+n}) by default
("span"): removing blocks i..i+n-1 feeds h_i to block i+n in place of h_{i+n}, so that is the
change the score must measure; the framework's own scripts run the discrete mode, whose
gap-1 score follows the same rule; and with the n+1 gap the last block can never be part of a
run. `consecutive_score="framework"` reproduces their n+1 gap.
"""

from __future__ import annotations


from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..arch.structure import require_droppable
from ..errors import MoECompressError, param
from ..walk.similarity import Similarities
from ..plan import DropMoeLayer, Plan
from ..stages.options import ConsecutiveScore, Mode, Unit



def _gap_offset(consecutive_score: str) -> int:
    if consecutive_score not in ("span", "framework"):
        raise MoECompressError(f"consecutive block-drop score must be 'span' or 'framework'; got {consecutive_score!r}.")
    return 0 if consecutive_score == "span" else 1


def _params(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _count_for_ratio(sizes: list[int], order: list[int], total: int, target_ratio: float) -> int:
    removed = 0
    for n, unit in enumerate(order, 1):
        removed += sizes[unit]
        if removed >= target_ratio * total:
            return n
    return len(order)


def distance_needed(
    model: PreTrainedModel, adapter: MoEAdapter, unit: Unit, mode: Mode, n: int | None, target_ratio: float | None,
    consecutive_score: ConsecutiveScore = "span",
) -> int:
    """How far apart the block boundaries compared while observing must be.

    A consecutive run sized by `target_ratio` is as long as the shortest run whose blocks
    could reach the target (blocks taken smallest first); the framework's score looks one further.
    """
    if unit == "moe" or mode == "discrete":
        return 1
    offset = _gap_offset(consecutive_score)
    if n is not None:
        return n + offset
    layers = adapter.decoder_layers(model)
    sizes, total = sorted(_params(layer) for layer in layers), _params(model)
    return next((d for d in range(1, len(layers)) if sum(sizes[:d]) >= target_ratio * total), len(layers) - 1) + offset


def plan_moe_drop(model: PreTrainedModel, adapter: MoEAdapter, chosen: list[int]) -> Plan:
    """The plan dropping exactly the MoE sub-layers of `chosen` (decoder indices), at least one MoE layer left routing."""
    require_droppable(model, adapter, "moe", chosen)
    layers = adapter.decoder_layers(model)
    plan = Plan(model_type=adapter.model_type, top_k=adapter.top_k(model.config), layers=[], method="moe-drop", num_layers=len(layers))
    plan.layers = [DropMoeLayer(layer=layer, num_experts=adapter.num_experts(adapter.moe_block(layers[layer]))) for layer in chosen]
    plan.meta = {"dropped_moe": chosen}
    return plan


def plan_block_drop(model: PreTrainedModel, adapter: MoEAdapter, chosen: list[int]) -> Plan:
    """The plan dropping exactly the decoder blocks `chosen` (the input's indices), a routed MoE layer left."""
    require_droppable(model, adapter, "block", chosen)
    plan = Plan(model_type=adapter.model_type, top_k=adapter.top_k(model.config), layers=[], method="block-drop",
                num_layers=len(adapter.decoder_layers(model)))
    plan.dropped_blocks = sorted(chosen)
    plan.meta = {"dropped_blocks": sorted(chosen)}
    return plan


def plan_drop(
    model: PreTrainedModel,
    adapter: MoEAdapter,
    scores: Similarities,
    unit: Unit = "moe",
    n: int | None = None,
    target_ratio: float | None = None,
    mode: Mode = "discrete",
    consecutive_score: ConsecutiveScore = "span",
) -> Plan:
    if (n is None) == (target_ratio is None):
        raise MoECompressError(f"give exactly one of {param('n')} N or {param('target_ratio')} R.")
    if target_ratio is not None and not 0.0 < target_ratio < 1.0:
        raise MoECompressError(f"target ratio must be in (0, 1); got {target_ratio}.")
    layers = adapter.decoder_layers(model)
    total = _params(model)
    plan = Plan(model_type=adapter.model_type, top_k=adapter.top_k(model.config), layers=[], method=f"{unit}-drop", num_layers=len(layers))
    if unit == "moe":
        adapter.require_separate_moe()
        order = sorted(scores.moe, key=lambda layer: (-scores.moe[layer], layer))
        sizes = {layer: _params(getattr(layers[layer], adapter.moe_attr)) for layer in order}
        count = n if n is not None else _count_for_ratio(sizes, order, total, target_ratio)
        if not 0 < count < len(order):
            raise MoECompressError(f"can drop 1..{len(order) - 1} of the {len(order)} MoE sub-layers (one must keep routing); asked for {count}.")
        chosen = sorted(order[:count])
        plan.layers = [DropMoeLayer(layer=layer, num_experts=adapter.num_experts(adapter.moe_block(layers[layer]))) for layer in chosen]
        plan.meta = {"scores": {str(k): v for k, v in scores.moe.items()}, "dropped_moe": chosen}
        return plan
    sizes = [_params(layer) for layer in layers]
    if mode == "discrete":
        similarity = scores.blocks[1]
        order = sorted(range(len(similarity)), key=lambda i: (-similarity[i], i))
        count = n if n is not None else _count_for_ratio(sizes, order, total, target_ratio)
        if not 0 < count < len(layers):
            raise MoECompressError(f"can drop 1..{len(layers) - 1} blocks; asked for {count}.")
        plan.dropped_blocks = sorted(order[:count])
    elif mode == "consecutive":
        offset = _gap_offset(consecutive_score)
        count = n if n is not None else max(scores.blocks) - offset
        if count + offset not in scores.blocks:
            raise MoECompressError(f"block similarities were observed up to distance {max(scores.blocks)}; asked for a run of {count}.")
        if not 0 < count < len(layers):
            raise MoECompressError(f"can drop runs of 1..{len(layers) - 1} blocks; asked for {count}.")
        similarity = scores.blocks[count + offset]
        start = max(range(len(similarity)), key=lambda i: (similarity[i], -i))
        plan.dropped_blocks = list(range(start, start + count))
    else:
        raise MoECompressError(f"block drop mode must be 'discrete' or 'consecutive'; got {mode!r}.")
    plan.method = f"block-drop-{mode}"
    plan.meta = {"scores": {str(d): v for d, v in scores.blocks.items()}}
    if mode == "consecutive":
        plan.meta["consecutive_score"] = consecutive_score
    return plan
