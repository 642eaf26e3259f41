"""MoNE: replace redundant experts with novices.

Statistics (one observer pass): access frequency a_e = mean over all tokens of the applied
gate g_{t,e}; and per dimension the mean and variance of f_e(x_t) over the tokens routed to
e (accumulated with Chan's pairwise update, no per-token buffers). Output variance
v_e = || std_{t in T_e} f_e(x_t) ||_2 (population std per dimension, then the L2 norm).

Redundancy r_e fuses the two (lower = more redundant = pruned first):
    product          r = a * v                              (default, as in the paper)
    minmax_product   r = mm(a) * mm(v)                      (mm: min-max scaling within the layer)
    weighted_sum     r = w * mm(a) + (1 - w) * mm(v)        (w = fusion_weight)
The authors' "fusion" metric (zxgx/mode-pd, `expert_prune_by_mone`) is (w v)((1 - w) a), a
constant multiple of the product, so it ranks experts exactly as `product` does.

Each pruned expert's weights are deleted and it becomes a *novice*: its router row stays (the
router keeps all E logits and its top-k), and a token routed to it gets g_{t,e} * n_e with
n_e = mean_{t in T_e} f_e(x_t). Memory per pruned expert falls from 3*H*I numbers to H.
`novices=False` keeps the router rows with zero vectors: the ablation the paper compares to
(the authors' `--zero_out_novice`).

Budgets. The authors offer two ranking scopes (`--expert_ranking_scope`): `layer` (the scripts
behind the paper's tables) and `model`, which ranks the raw fused scores of all layers together
against one threshold. A global budget here does the latter by default (`global_scores="raw"`);
an explicit budget (`keep={layer: count}`, what `fit` chose) keeps each layer's best-scored `count`,
with no tie rule (the count is given, so no boundary score may lower it);
`global_scores="layer_normalised"` divides each layer's scores by their sum first (moe-compress's
earlier behaviour: a and v both drift with depth, so raw scores let the layers with the largest
outputs keep the most experts). As in the authors' code, experts whose score equals the boundary
(the best removed score) are removed with it -- their threshold keeps only scores strictly above
it. Because the router keeps every row, a layer may keep fewer real experts than top_k (the
authors' code has no floor at all); one real expert always stays. Group-limited routers need no
group balance either, since their router rows all stay.

Output format. `output_format="expert-substitution"` writes the result in the format vLLM PR #50415
reads and llm-compressor PR #2906 writes (`sink.substitution`): the family's own architecture, full
routers, retained experts under their original ids, one constant per novice. Its router semantics are
MoNE's: a novice's constant is scaled by the router weight the family computes over the full top-k
(renormalised there if the family renormalises its top-k, as the authors' code does), and nothing is
renormalised over the retained experts afterwards (`renormalize_after_substitution: false`). The default
`pruned` writes the generated modelling code's own layout (novice vectors and a slot map per layer).

Variance. The authors keep a running estimate per expert, updated at every forward of the expert
(one per calibration batch): mean <- mean n/(n+m) + sum(out)/(n+m), then, unless n = 0,
fluc <- fluc (n-1)/(n+m-1) + sum((out - mean)^2)/(n+m) -- so an expert's first batch adds no
variation, and the result depends on the batch order. `variance="running"` (default) replays
exactly that recursion from per-batch moments (statistic `output_moments_per_batch`, merged back
into batch order across ranks); `variance="exact"` uses the population variance over all routed
tokens (Chan's merge; moe-compress's behaviour before issue 13). On the bundled models the two
rank experts the same within layers and differ at near-ties across layers (bench/fidelity.py).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from ..arch.table import experts_stored_per_expert
from ..errors import MoECompressError, param
from ..runtime import OUTPUT_FORMAT_KEY, SUBSTITUTION
from ..walk.moments import output_moments, split_moments
from ..plan import NoviceLayer, Plan, RoutingLimits
from .budget import select_experts
from .registry import Method, PlanRequest, register

# The options' values as types: `prune --option` and the Prune stage refuse any other before calibrating.
Fusion = Literal["product", "minmax_product", "weighted_sum"]
GlobalScores = Literal["raw", "layer_normalised"]
Variance = Literal["running", "exact"]
OutputFormat = Literal["pruned", "expert-substitution"]
FUSIONS, GLOBAL_SCORES, VARIANCES, OUTPUT_FORMATS = (get_args(kind) for kind in (Fusion, GlobalScores, Variance, OutputFormat))
assert SUBSTITUTION in OUTPUT_FORMATS


def _minmax(values: torch.Tensor) -> torch.Tensor:
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def access_and_variance(layer_stats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_e, v_e, novice vectors n_e [E, H]) of one layer."""
    access = layer_stats["gate_sum"] / layer_stats["tokens"]
    _, mean, variance = split_moments(layer_stats["output_moments"])
    return access, variance.sqrt().norm(dim=1), mean


def running_variation(per_batch: torch.Tensor) -> torch.Tensor:
    """v_e from the authors' running estimate, replayed over per-batch moments [batches, E, 1 + 2H]."""
    hidden = (per_batch.shape[-1] - 1) // 2
    experts = per_batch.shape[1]
    count = torch.zeros(experts, 1, dtype=torch.float64)
    mean = torch.zeros(experts, hidden, dtype=torch.float64)
    fluc = torch.zeros(experts, hidden, dtype=torch.float64)
    for moments in per_batch.double():
        m, batch_mean, batch_m2 = moments[:, :1], moments[:, 1 : 1 + hidden], moments[:, 1 + hidden :]
        seen = m > 0  # an expert without tokens in this batch is not called: nothing changes
        total = (count + m).clamp_min(1)
        new_mean = torch.where(seen, mean * count / total + batch_mean * m / total, mean)
        # sum over the batch of (out - new_mean)^2 = M2_batch + m (mean_batch - new_mean)^2
        squares = batch_m2 + m * (batch_mean - new_mean) ** 2
        update = fluc * (count - 1) / (count + m - 1).clamp_min(1) + squares / total
        fluc = torch.where(seen & (count > 0), update, fluc)
        mean, count = new_mean, count + m
    return fluc.sqrt().norm(dim=1)


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


def remove_boundary_ties(kept: dict[int, list[int]], compared: dict[int, torch.Tensor], per_layer: bool, floor: int) -> dict[int, list[int]]:
    """The authors' threshold rule: keep only experts scoring strictly above the best removed score.

    The boundary is per layer for a layer budget and one value for the whole model for a global
    one, as in their code; a layer that would fall below `floor` keeps its selection unchanged.
    """

    def best_removed(layer: int) -> float | None:
        removed = [e for e in range(compared[layer].numel()) if e not in set(kept[layer])]
        return float(compared[layer][removed].max()) if removed else None

    boundaries = {layer: best_removed(layer) for layer in kept}
    if not per_layer:
        found = [b for b in boundaries.values() if b is not None]
        boundaries = {layer: max(found) if found else None for layer in kept}
    result = {}
    for layer, experts in kept.items():
        boundary = boundaries[layer]
        strict = experts if boundary is None else [e for e in experts if float(compared[layer][e]) > boundary]
        result[layer] = strict if len(strict) >= floor else experts
    return result


def _statistics(options: dict) -> tuple[str, ...]:
    if options["variance"] not in VARIANCES:
        raise MoECompressError(f"mone: variance must be one of {', '.join(VARIANCES)}; got {options['variance']!r}.")
    return ("gate_sum", "output_moments_per_batch" if options["variance"] == "running" else "output_moments")


def _layer_scores(layer_stats: dict[str, torch.Tensor], variance: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_e, v_e, novice vectors) with the chosen variance estimate."""
    if variance == "exact":
        return access_and_variance(layer_stats)
    per_batch = layer_stats["output_moments_per_batch"]
    if per_batch.shape[0] < 2:
        raise MoECompressError(
            "mone's running variance (the authors' estimate) adds nothing for an expert's first calibration batch, so one "
            f"batch gives every expert zero variance: calibrate on more batches ({param('samples')} above {param('batch_size')}) or pass variance=exact."
        )
    return layer_stats["gate_sum"] / layer_stats["tokens"], running_variation(per_batch), split_moments(output_moments(layer_stats))[1]


def check_output_format(output_format: str, request: PlanRequest) -> None:
    """The format must exist, and the substitution format needs a family stored one tensor per expert (vLLM reads no fused experts)."""
    if output_format not in OUTPUT_FORMATS:
        raise MoECompressError(f"mone: output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}.")
    if output_format == SUBSTITUTION and request.model is not None and not experts_stored_per_expert(request.model, request.adapter):
        raise MoECompressError(f"mone: {request.adapter.model_type} stores its routed experts fused on disk, and the expert-substitution "
                               "format (vLLM) reads retained experts one tensor each; use output_format=pruned for this family.")


def plan_mone(
    request: PlanRequest, fusion: Fusion = "product", fusion_weight: float = 0.5, novices: bool = True, global_scores: GlobalScores = "raw",
    variance: Variance = "running", output_format: OutputFormat = "pruned",
) -> Plan:
    check_output_format(output_format, request)
    if global_scores not in GLOBAL_SCORES:
        raise MoECompressError(f"mone: global_scores must be one of {', '.join(GLOBAL_SCORES)}; got {global_scores!r}.")
    _statistics({"variance": variance})
    scores, vectors = {}, {}
    for layer, layer_stats in request.stats.items():
        access, variation, mean = _layer_scores(layer_stats, variance)
        scores[layer] = redundancy(access, variation, fusion, fusion_weight)
        vectors[layer] = mean
    # Novices keep every router row, so a layer may keep fewer real experts than top_k; one must stay.
    floor = max(1, request.min_keep)
    normalise = request.budget == "global" and global_scores == "layer_normalised"
    kept = select_experts(scores, request.ratio, request.budget, RoutingLimits(1), normalise=normalise, min_keep=floor, keep=request.keep)
    compared = {layer: s / s.sum().clamp_min(1e-30) for layer, s in scores.items()} if normalise else scores
    if request.budget != "explicit":
        kept = remove_boundary_ties(kept, compared, request.budget == "layer", floor)
    layers = [NoviceLayer(layer=layer, num_experts=s.numel(), keep=kept[layer], scores=[float(v) for v in s]) for layer, s in sorted(scores.items())]
    plan = Plan(model_type=request.adapter.model_type, top_k=request.adapter.top_k(request.config), layers=layers, method="mone",
                ratio=request.ratio, budget=request.budget)
    plan.meta = {"fusion": fusion, "fusion_weight": fusion_weight, "novices": novices, "global_scores": global_scores, "variance": variance}
    if output_format != "pruned":  # the default leaves plans as they were
        plan.meta[OUTPUT_FORMAT_KEY] = output_format
    for lp in layers:
        removed = torch.tensor(lp.removed, dtype=torch.long)
        if novices and len(removed):
            plan.novice_vectors[lp.layer] = vectors[lp.layer][removed].float()
    return plan


register(
    Method(
        "mone",
        _statistics,
        plan_mone,
        "replace low-access, low-variance experts by their mean output (MoNE)",
        options={"fusion": "product", "fusion_weight": 0.5, "novices": True, "global_scores": "raw", "variance": "running", "output_format": "pruned"},
        option_help={
            "fusion": "how access frequency and output variance combine: product, minmax_product or weighted_sum",
            "fusion_weight": "weight of access frequency in weighted_sum fusion, in [0, 1]",
            "novices": "false: keep router rows but give pruned experts zero vectors (ablation)",
            "global_scores": "global budget: compare raw fused scores across layers (raw, the authors' model scope) or each layer's share (layer_normalised)",
            "variance": "output variance as the authors' running estimate (running) or the population variance (exact)",
            "output_format": "pruned (generated modelling code's layout) or expert-substitution (vLLM #50415 / llm-compressor #2906: full routers, constants)",
        },
        substitutes=True,
        layer_local=True,
    )
)
