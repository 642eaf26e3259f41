"""Turning per-expert scores into kept sets under a layer-wise or a global budget.

Group-limited routers (DeepSeek-V3, GLM) choose groups of experts before experts, so every
group must keep the same number of experts: selection works in *units* of one expert per
group. Without groups a unit is one expert, and the same code serves both cases.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import MoECompressError
from ..plan import RoutingLimits

Budget = Literal["layer", "global"]


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise MoECompressError(f"ratio must be in [0, 1): the fraction of routed experts to remove; got {ratio}.")


def _group_order(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups, per_group] expert ids, each group's members sorted by descending score."""
    ids = torch.arange(scores.numel()).view(groups, -1)
    order = torch.argsort(scores.view(groups, -1), dim=1, descending=True, stable=True)
    return ids.gather(1, order)


def _keep_units(scores: torch.Tensor, groups: int, units: int) -> list[int]:
    return sorted(_group_order(scores, groups)[:, :units].reshape(-1).tolist())


def select_experts(
    scores: dict[int, torch.Tensor],
    ratio: float,
    budget: Budget,
    limits: RoutingLimits,
    normalise: bool = False,
    min_keep: int = 0,
) -> dict[int, list[int]]:
    """Kept expert ids per layer.

    layer:  every layer keeps round(E(1-ratio)) experts (per group: round(E/G (1-ratio))).
    global: the model keeps round(sum_l E_l (1-ratio)) experts in total, chosen by comparing
            scores across layers (each layer's scores divided by their sum when `normalise`),
            each layer keeping at least max(top_k, min_keep) experts.
    """
    check_ratio(ratio)
    if budget not in ("layer", "global"):
        raise MoECompressError(f"budget must be 'layer' or 'global'; got {budget!r}.")
    groups = limits.groups
    floor_units = max(limits.min_units(), math.ceil(min_keep / groups))
    for layer, s in scores.items():
        if s.numel() % groups:
            raise MoECompressError(f"layer {layer}: {s.numel()} experts cannot be split into {groups} equal routing groups.")

    if budget == "layer":
        kept = {}
        for layer, s in scores.items():
            units = _round_half_up(s.numel() // groups * (1.0 - ratio))
            if units < floor_units:
                raise MoECompressError(
                    f"ratio {ratio} leaves layer {layer} with {units * groups} experts, fewer than its router needs "
                    f"({floor_units * groups}: top_k={limits.top_k}, {groups} group(s)). Use a smaller --ratio."
                )
            kept[layer] = _keep_units(s, groups, units)
        return kept

    total_units = _round_half_up(sum(s.numel() // groups for s in scores.values()) * (1.0 - ratio))
    if total_units < floor_units * len(scores):
        raise MoECompressError(
            f"ratio {ratio} leaves {total_units * groups} experts in total, fewer than the {floor_units * groups} per layer "
            f"that {len(scores)} MoE layers need. Use a smaller --ratio."
        )
    # Score of a layer's j-th unit: mean over groups of each group's j-th best expert.
    unit_scores: dict[int, torch.Tensor] = {}
    for layer, s in scores.items():
        if normalise:
            s = s / s.sum().clamp_min(1e-30)
        sorted_scores = s[_group_order(s, groups)]
        unit_scores[layer] = sorted_scores.mean(dim=0)
    candidates = [
        (-float(u[j]), layer, j) for layer, u in unit_scores.items() for j in range(floor_units, u.numel())
    ]
    candidates.sort()
    units = {layer: floor_units for layer in scores}
    for _, layer, _ in candidates[: total_units - floor_units * len(scores)]:
        units[layer] += 1
    return {layer: _keep_units(s, groups, units[layer]) for layer, s in scores.items()}
