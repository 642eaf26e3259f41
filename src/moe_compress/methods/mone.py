"""MoNE: replace redundant experts with novices.

Statistics (one observer pass): access frequency a_e = mean over all tokens of the applied
gate g_{t,e}; and per dimension the mean and variance of f_e(x_t) over the tokens routed to
e (accumulated with Chan's pairwise update, no per-token buffers). Output variance
v_e = || std_{t in T_e} f_e(x_t) ||_2 (population std per dimension, then the L2 norm).

Redundancy r_e fuses the two (lower = more redundant = pruned first):
    product          r = a * v                              (default, as in the paper)
    minmax_product   r = mm(a) * mm(v)                      (mm: min-max scaling within the layer)
    weighted_sum     r = w * mm(a) + (1 - w) * mm(v)        (w = fusion_weight)
Each pruned expert's weights are deleted and it becomes a *novice*: its router row stays (the
router keeps all E logits and its top-k), and a token routed to it gets g_{t,e} * n_e with
n_e = mean_{t in T_e} f_e(x_t). Memory per pruned expert falls from 3*H*I numbers to H.
`novices=False` keeps the router rows with zero vectors: the ablation the paper compares to.

Choice where the paper is silent: with a global budget, r_e is divided by its layer's sum
before layers are compared (a and v both shrink or grow with depth). Group-limited routers
need no group balance here, because their router rows all stay.
"""

from __future__ import annotations

import torch

from ..errors import MoECompressError
from ..observe.statistics import split_moments
from ..plan import LayerPlan, Plan, RoutingLimits
from .budget import select_experts
from .registry import Method, PlanRequest, register

FUSIONS = ("product", "minmax_product", "weighted_sum")


def _minmax(values: torch.Tensor) -> torch.Tensor:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def access_and_variance(layer_stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_e, v_e, novice vectors n_e [E, H]) of one layer."""
    access = layer_stats["gate_sum"] / layer_stats["tokens"]
    _, mean, variance = split_moments(layer_stats["output_moments"])
    return access, variance.sqrt().norm(dim=1), mean


def redundancy(access: torch.Tensor, variance: torch.Tensor, fusion: str = "product", weight: float = 0.5) -> torch.Tensor:
    if fusion == "product":
        return access * variance
    if fusion == "minmax_product":
        return _minmax(access) * _minmax(variance)
    if fusion == "weighted_sum":
        if not 0.0 <= weight <= 1.0:
            raise MoECompressError(f"fusion weight must be in [0, 1]; got {weight}.")
        return weight * _minmax(access) + (1 - weight) * _minmax(variance)
    raise MoECompressError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}.")


def plan_mone(request: PlanRequest, fusion: str = "product", fusion_weight: float = 0.5, novices: bool = True) -> Plan:
    scores, vectors = {}, {}
    for layer, layer_stats in request.stats.items():
        access, variance, mean = access_and_variance(layer_stats)
        scores[layer] = redundancy(access, variance, fusion, fusion_weight)
        vectors[layer] = mean
    limits = RoutingLimits(request.adapter.top_k(request.config))
    kept = select_experts(scores, request.ratio, request.budget, limits, normalise=True, min_keep=request.min_keep)
    layers = [LayerPlan(layer, s.numel(), kept[layer], [float(v) for v in s], novices=True) for layer, s in sorted(scores.items())]
    plan = Plan(request.adapter.model_type, limits.top_k, layers, method="mone", ratio=request.ratio, budget=request.budget)
    plan.meta = {"fusion": fusion, "fusion_weight": fusion_weight, "novices": novices}
    for lp in layers:
        removed = torch.tensor(lp.removed, dtype=torch.long)
        if novices and len(removed):
            plan.novice_vectors[lp.layer] = vectors[lp.layer][removed].float()
    return plan


register(
    Method(
        "mone",
        ("gate_sum", "output_moments"),
        plan_mone,
        "replace low-access, low-variance experts by their mean output (MoNE)",
        options={"fusion": "product", "fusion_weight": 0.5, "novices": True},
    )
)
