"""Expert-importance criteria: each turns observed running sums into one score per expert.

Formulas (DESIGN.md, "Expert pruning criteria"), for one MoE layer over T calibration tokens:
    frequency   |T_e| / T
    soft_count  mean_t p_{t,e}            (full router distribution, before top-k)
    gate_sum    mean_t g_{t,e}            (gate weight actually applied, 0 if not selected)
    ean         sum_{t in T_e} ||f_e(x_t)||
    reap        mean_{t in T_e} g_{t,e} ||f_e(x_t)||
Higher is more important; the lowest-scored experts are pruned.

soft_count is the unified framework's expert drop for Mixtral and Qwen (`MixtralExpertDropWrapper`:
mean softmax of the router logits), gate_sum its DeepSeek variant (`DeepseekExpertDropWrapper`:
mean scattered top-k weight). Their global budget compares these means across layers as they
are, which is sound because a softmax distribution sums to 1 in every layer. A sigmoid router's
scores do not (ref-deepseek: one layer's sigmoid mass is several times another's, so a global
budget emptied that layer down to 7 of 32 experts); `router_dist_sum` therefore normalises each
token's sigmoid scores to sum to 1, which leaves softmax routers exactly as they were.

REAP's g: the REAP authors' observer (`reap/pruning_metrics.py`) uses the router probabilities
of the selected experts, renormalised over the token's top-k only when the model itself does
(`model.config.norm_topk_prob`). `reap_scores(renormalise=...)` picks the matching running sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Stats = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Criterion:
    """A registered importance score.

    `normalise_globally`: scores whose scale drifts with depth (output norms grow along the
    residual stream) are divided by their layer's total before a global budget compares
    layers; scores that are already fractions of the layer's traffic are compared as they are.
    """

    name: str
    statistics: tuple[str, ...]
    score: Callable[[Stats], torch.Tensor]
    normalise_globally: bool
    doc: str


def _mean_over_routed(total: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean over T_e; an expert that received no token scores 0."""
    return torch.where(selected > 0, total / selected.clamp_min(1), torch.zeros_like(total))


def reap_scores(stats: Stats, renormalise: bool) -> torch.Tensor:
    """REAP saliency with the top-k gates renormalised (g / sum of the token's top-k) or as probabilities."""
    return _mean_over_routed(stats["reap_sum" if renormalise else "reap_prob_sum"], stats["selected"])


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("frequency", ("selected",), lambda s: s["selected"] / s["tokens"], False, "share of tokens routed to the expert"),
        Criterion(
            "soft_count", ("router_dist_sum",), lambda s: s["router_dist_sum"] / s["tokens"], False,
            "mean router probability before top-k (unified framework's expert drop)",
        ),
        Criterion("gate_sum", ("gate_sum",), lambda s: s["gate_sum"] / s["tokens"], False, "mean applied gate weight (unified framework, DeepSeek)"),
        Criterion("ean", ("output_norm_sum",), lambda s: s["output_norm_sum"], True, "summed output norm over routed tokens"),
        Criterion(
            "reap",
            ("reap_sum", "selected"),
            lambda s: reap_scores(s, renormalise=True),
            True,
            "mean router-weighted output norm over routed tokens (REAP)",
        ),
    )
}


def layer_scores(criterion: str, stats: dict[int, Stats]) -> dict[int, torch.Tensor]:
    """Scores per MoE layer for a registered criterion."""
    return {layer: CRITERIA[criterion].score(layer_stats).double() for layer, layer_stats in stats.items()}
