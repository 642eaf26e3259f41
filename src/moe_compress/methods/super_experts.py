"""The super-expert guard: never remove or merge the few experts with extreme activation outliers.

"Unveiling Super Experts in Mixture-of-Experts LLMs" (Su et al., 2025) finds that a handful of
routed experts produce rare but extreme outliers at the output of their down projection; these
feed the massive activations (and attention sinks) of the residual stream, and removing three
of them out of ~6000 makes Qwen3-30B-A3B emit repetitive text. Detection follows the authors'
profiling code (ZunhaiSu/Super-Experts-Profilling, `_identify_super_experts`):

  * per expert, the largest |down_proj output| seen on calibration data (our statistic
    `max_output_abs`, exact under merging: the max of maxima);
  * only the first 75 % of decoder layers are considered (their `include_layers=0.75`);
  * an expert is super if its value exceeds the 99.5th percentile of all considered values
    and a tenth of the largest one.
Two choices where the code differs from its evident intent: the authors take `max // 10`
(floor division, which is 0 for maxima below 10), we take max / 10; and they also count shared
experts' and dense MLPs' maxima in the percentile, which the guard cannot protect anyway --
we rank routed experts only.

Expert-pruning plans are repaired after planning (a removed super expert takes the place of
the least important kept expert of its routing group); merging methods plan with the guard
themselves (a super expert is kept as a singleton: nothing merges into it, it merges into nothing).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MoECompressError
from ..walk.moments import output_moments, split_moments
from ..plan import KeepLayer, NoviceLayer, Plan

STATISTIC = "max_output_abs"
QUANTILE = 99.5
SHARE_OF_MAX = 0.1
INCLUDE_LAYERS = 0.75


def considered_layers(num_layers: int) -> int:
    """Decoder layers below this index are searched for super experts; the others never have any."""
    return round(num_layers * INCLUDE_LAYERS)


def _threshold(flat: np.ndarray) -> float:
    return max(float(np.percentile(flat, QUANTILE)), float(flat.max()) * SHARE_OF_MAX)


def find_super_experts(stats: dict[int, dict[str, torch.Tensor]], num_layers: int) -> dict[int, list[int]]:
    """Super experts per MoE layer (layers without any are absent)."""
    include = considered_layers(num_layers)
    values = {layer: s[STATISTIC].double() for layer, s in stats.items() if layer < include}
    if not values:
        return {}
    threshold = _threshold(torch.cat(list(values.values())).numpy())
    found = {layer: [int(e) for e in (v > threshold).nonzero().flatten()] for layer, v in values.items()}
    return {layer: experts for layer, experts in found.items() if experts}


def threshold_floor(seen: list[torch.Tensor], total: int) -> float:
    """A lower bound of `find_super_experts`' threshold when only the maxima `seen` of the `total` considered experts
    are known (what a walk has observed so far): the unknown ones are >= 0 (absolute values), and neither a
    percentile nor a maximum rises when a value falls, so taking them as 0 bounds the final threshold from below.
    An expert whose maximum is at most this is no super expert, whatever the layers still to come hold."""
    flat = torch.cat([*(v.double() for v in seen), torch.zeros(total - sum(v.numel() for v in seen), dtype=torch.float64)])
    return _threshold(flat.numpy())


def _group_of(expert: int, lp: KeepLayer | NoviceLayer, groups: int) -> int:
    return expert // (lp.num_experts // groups)


def keep_super_experts(plan: Plan, protected: dict[int, list[int]], stats: dict[int, dict[str, torch.Tensor]]) -> list[str]:
    """Make every layer of an expert-pruning plan keep its super experts; returns what changed.

    A removed super expert replaces the kept, unprotected expert of its routing group with the
    lowest score (the plan's scores; routing frequency if it has none), so counts and group
    balance stay as planned. MoNE layers get the swapped-out expert's novice vector. Condensed
    and dropped layers have no routing to protect; merging methods guard while they plan.
    """
    changes = []
    for index, lp in enumerate(plan.layers):
        wanted = [e for e in protected.get(lp.layer, []) if e not in lp.keep]
        if not wanted or lp.action in ("condense", "drop_moe"):
            continue
        if lp.action == "merge":
            raise MoECompressError(f"plan layer {lp.layer} merges experts; its method must plan with the super-expert guard itself.")
        importance = lp.scores if lp.scores is not None else stats[lp.layer]["selected"].tolist()
        keep = lp.keep
        for expert in wanted:
            candidates = [
                e for e in keep
                if e not in protected[lp.layer] and _group_of(e, lp, plan.routing_groups) == _group_of(expert, lp, plan.routing_groups)
            ]
            if not candidates:
                raise MoECompressError(f"layer {lp.layer}: every kept expert of super expert {expert}'s routing group is itself a super expert.")
            out = min(candidates, key=lambda e: (importance[e], e))
            keep = sorted(set(keep) - {out} | {expert})
            changes.append(f"layer {lp.layer}: keeps super expert {expert} instead of {out}")
        lp = plan.layers[index] = type(lp)(**{**lp.model_dump(), "keep": keep})  # entries are frozen: rebuilt, and checked again
        if lp.action == "novices" and lp.layer in plan.novice_vectors:
            _, mean, _ = split_moments(output_moments(stats[lp.layer]))
            plan.novice_vectors[lp.layer] = mean[torch.tensor(lp.removed, dtype=torch.long)].float()
    return changes
