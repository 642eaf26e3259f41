"""Expert-importance criteria: each turns observed running sums into one score per expert.

Formulas (DESIGN.md, "Expert pruning criteria"), for one MoE layer over T calibration tokens:
    frequency   |T_e| / T
    soft_count  mean_t p_{t,e}            (full router distribution, before top-k)
    gate_sum    mean_t g_{t,e}            (gate weight actually applied, 0 if not selected)
    ean         sum_{t in T_e} ||f_e(x_t)||
    reap        mean_{t in T_e} g~_{t,e} ||f_e(x_t)||   (g~ renormalised over the top-k)
Higher is more important; the lowest-scored experts are pruned.
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


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("frequency", ("selected",), lambda s: s["selected"] / s["tokens"], False, "share of tokens routed to the expert"),
        Criterion("soft_count", ("prob_sum",), lambda s: s["prob_sum"] / s["tokens"], False, "mean router probability before top-k"),
        Criterion("gate_sum", ("gate_sum",), lambda s: s["gate_sum"] / s["tokens"], False, "mean applied gate weight"),
        Criterion("ean", ("output_norm_sum",), lambda s: s["output_norm_sum"], True, "summed output norm over routed tokens"),
        Criterion(
            "reap",
            ("reap_sum", "selected"),
            lambda s: _mean_over_routed(s["reap_sum"], s["selected"]),
            True,
            "mean router-weighted output norm over routed tokens (REAP)",
        ),
    )
}


def layer_scores(criterion: str, stats: dict[int, Stats]) -> dict[int, torch.Tensor]:
    """Scores per MoE layer for a registered criterion."""
    return {layer: CRITERIA[criterion].score(layer_stats).double() for layer, layer_stats in stats.items()}
