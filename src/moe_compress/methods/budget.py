"""Turning per-expert scores into kept sets under a layer-wise or a global budget.

Counts. Every reference implementation that takes a ratio truncates the number of experts it
removes: REAP (`int(num_experts * compression_ratio)`), llm-compressor's REAP modifier
(`int(num_experts * sparsity)`), C-Prune (`int(prune_rate * num_experts)`), and MoNE's global
threshold (`ceil(total * preserve / E)` kept, i.e. the removed count truncated). So a layer
removes floor(E * ratio) experts and a global budget removes floor(sum_l E_l * ratio); when
E * ratio is not an integer the model keeps one expert more than rounding would. (The float
product is nudged by 1e-9 before truncating, so 0.29 x 100 removes 29 experts, not 28.)

Ties. Experts are removed in ascending score order; equal scores are removed lower expert
index first (and, under a global budget, lower layer first). That is C-Prune's reference rule
(Python's stable sort of votes). REAP, llm-compressor and the unified framework call
`torch.topk(..., largest=False)`, whose order among equal values is implementation-defined
(on CPU it returned [6, 5, 4, 7] for eight zeros): no rule reproduces it in general, so ours
is the stable one. Ties are rare for continuous scores; experts that received no token
(score 0) are the common case.

Group-limited routers (DeepSeek-V3, GLM) choose groups of experts before experts, so every
group must keep the same number of experts: selection works in *units* of one expert per
group, and each group removes round(floor(E * ratio) / G) experts, as llm-compressor does.
Without groups a unit is one expert, and the same code serves both cases.

An explicit budget gives each layer's kept count itself (`keep={layer: count}`: what `fit`'s
solver chose); the scores then choose only *which* experts each layer keeps, as a layer budget does.
"""

from __future__ import annotations

import math

import torch

from ..errors import MoECompressError, OptionError, param
from ..plan import RoutingLimits
from ..stages.options import Budget


#: Guard against float products such as 0.29 * 100 = 28.999999999999996 before truncating.
_EPSILON = 1e-9


def removed_count(total: int, ratio: float) -> int:
    """Experts removed from `total` at `ratio`: truncated, as every reference implementation does."""
    return int(math.floor(total * ratio + _EPSILON))


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise OptionError("ratio", f"must be in [0, 1): the fraction of routed experts to remove; got {ratio}.")


def removal_order(scores: torch.Tensor) -> torch.Tensor:
    """Expert ids in the order they are removed: ascending score, lower index first on ties."""
    return torch.argsort(scores, stable=True)


def _group_order(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, per_group] expert ids, each group's members in removal order (first removed first)."""
    ids = torch.arange(scores.numel()).view(groups, -1)
    return ids.gather(1, torch.argsort(scores.view(groups, -1), dim=1, stable=True))


def _keep_units(scores: torch.Tensor, groups: int, units: int) -> list[int]:
    order = _group_order(scores, groups)
    return sorted(order[:, order.shape[1] - units :].reshape(-1).tolist())


def _units_removed_per_layer(experts: int, groups: int, ratio: float) -> int:
    removed = removed_count(experts, ratio)
    return removed if groups == 1 else round(removed / groups)


def _explicit_units(layer: int, experts: int, keep: dict[int, int] | None, groups: int, floor_units: int) -> int:
    """Units layer `layer` keeps under an explicit budget, checked against its experts, groups and floor."""
    if keep is None or layer not in keep:
        raise MoECompressError(f"an explicit budget needs a kept count for every MoE layer (keep={{layer: count}}); layer {layer} has none.")
    count = keep[layer]
    if count % groups or not floor_units * groups <= count <= experts:
        raise MoECompressError(
            f"layer {layer} cannot keep {count} of its {experts} experts: keep a multiple of its {groups} routing group(s) "
            f"from {floor_units * groups} (top_k and {param('min_keep')}) to {experts}."
        )
    return count // groups


def select_experts(
    scores: dict[int, torch.Tensor],
    ratio: float,
    budget: Budget,
    limits: RoutingLimits,
    normalise: bool = False,
    min_keep: int = 0,
    keep: dict[int, int] | None = None,
) -> dict[int, list[int]]:
    """Kept expert ids per layer.

    layer:  every layer removes floor(E * ratio) experts (per group: round(floor(E * ratio) / G)).
    global: the model removes floor(sum_l E_l * ratio) experts in total, chosen by comparing
            scores across layers (each layer's scores divided by their sum when `normalise`),
            each layer keeping at least max(top_k, min_keep) experts. The floor is ours: the
            unified framework and MoNE compare raw scores with no floor, which can empty a layer.
    explicit: layer l keeps `keep[l]` experts (a multiple of the routing groups, at least the
            floor), its best-scored ones; `ratio` is not read.
    """
    check_ratio(ratio)
    if budget not in ("layer", "global", "explicit"):
        raise MoECompressError(f"budget must be 'layer', 'global' or 'explicit'; got {budget!r}.")
    groups = limits.groups
    floor_units = max(limits.min_units(), math.ceil(min_keep / groups))
    for layer, s in scores.items():
        if s.numel() % groups:
            raise MoECompressError(f"layer {layer}: {s.numel()} experts cannot be split into {groups} equal routing groups.")

    if budget == "explicit":
        unknown = sorted(set(keep or {}) - set(scores))
        if unknown:
            raise MoECompressError(f"keep names layer(s) {unknown}, which are not MoE layers of this model (those are {sorted(scores)}).")
        return {layer: _keep_units(s, groups, _explicit_units(layer, s.numel(), keep, groups, floor_units)) for layer, s in scores.items()}
    if budget == "layer":
        kept = {}
        for layer, s in scores.items():
            units = s.numel() // groups - _units_removed_per_layer(s.numel(), groups, ratio)
            if units < floor_units:
                raise MoECompressError(
                    f"ratio {ratio} leaves layer {layer} with {units * groups} experts, fewer than its router needs "
                    f"({floor_units * groups}: top_k={limits.top_k}, {groups} group(s)). Use a smaller {param('ratio')}."
                )
            kept[layer] = _keep_units(s, groups, units)
        return kept

    total = sum(s.numel() // groups for s in scores.values())
    total_units = total - _units_removed_per_layer(total * groups, groups, ratio)
    if total_units < floor_units * len(scores):
        raise MoECompressError(
            f"ratio {ratio} leaves {total_units * groups} experts in total, fewer than the {floor_units * groups} per layer "
            f"that {len(scores)} MoE layers need. Use a smaller {param('ratio')}."
        )
    # Score of a layer's j-th unit (in removal order): mean over groups of each group's j-th expert.
    candidates = []
    for layer, s in sorted(scores.items()):
        if normalise:
            s = s / s.sum().clamp_min(1e-30)
        unit_scores = s[_group_order(s, groups)].mean(dim=0)
        removable = unit_scores.numel() - floor_units
        candidates += [(float(unit_scores[j]), layer, j) for j in range(removable)]
    candidates.sort()
    removed = {layer: 0 for layer in scores}
    for _, layer, _ in candidates[: total - total_units]:
        removed[layer] += 1
    return {layer: _keep_units(s, groups, s.numel() // groups - removed[layer]) for layer, s in scores.items()}
