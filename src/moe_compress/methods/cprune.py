"""C-Prune (reference mode): cluster-driven expert pruning as the authors' code does it.

Source: Fighoture/MoE_unsupervised_pruning, `pruning_mask.py` (`PreTrainedMoEPruner`) and
`utils/uns_utils.py` (`cluster_for_prune`), run by `scripts/pruning_mask.sh`.

Signatures. Each calibration sequence's MoE input is mean-pooled over its tokens; every expert
runs on that one vector (statistic `pooled_expert_outputs`, rounded to float16 as the authors
do before clustering). Sequences are taken in batches of `batch` (32); in each batch an expert's
signature is its outputs on the batch's sequences, flattened.

Stage 1, per layer, at rate r1. For every batch: Euclidean distances between signatures; Ward
linkage over each expert's row of that distance matrix (the authors pass the square matrix to
scipy's `linkage`, which treats rows as observations); `fcluster(maxclust=clusters)` (12).
Within each cluster, clusters of fewer than `small` (3) members vote for all of them; larger
ones vote for their first int(c * (1 - r1) * size) members by distance to the cluster's mean
signature, with c = 0.5 + 0.6 * (exp(0.5 - p) - exp(p - 0.5) / (exp(p - 0.5) + exp(0.5 - p))),
p = size / E (the expression exactly as written, precedence included; `dynamic_coef_compute`).
The floor(r1 * E) experts with the fewest votes are pruned (equal votes: lower index first).

Stage 2, global, at rate r2 (budget="global" only). The survivors of every layer, layer after
layer, are clustered the same way together (`global_clusters`, 6), with the same keep rule
(p still relative to E); the floor(r2 * survivors) least-voted are pruned. A layer may lose at
most int((n1 // r1) * 0.9) experts in stage 2, n1 being its stage-1 count (the authors' cap,
truncating the layer's stage-2 list in vote order), and never drops below top_k (ours).

Rates. budget="layer": r1 = ratio, no stage 2. budget="explicit" (`keep={layer: count}`, what `fit`
chose): stage 1 alone, each layer at its own rate r1 = (E - count) / E, so that it prunes E - count
(its votes at that rate). budget="global": r1 = 1 - sqrt(1 - ratio) (equal per-stage rates, as the authors' script uses 0.1 / 0.1), and stage 2 removes what is left of
floor(ratio * all experts), r2 being that count over the survivors. `stage1_rate` /
`stage2_rate` set them directly.

Choices here that the paper leaves open are the code's; `cprune-cosine` is moe-compress's earlier
variant. The method is meant for fine-grained MoE: with fewer experts than clusters every expert
is its own cluster, all votes tie, and the lowest indices would be pruned -- so that is refused.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from ..errors import MoECompressError, param
from ..plan import KeepLayer, Plan
from .budget import removal_order, removed_count, select_experts
from .expert_pruning import routing_limits
from .registry import Method, PlanRequest, register


def keep_coefficient(size: int, experts: int) -> float:
    """The authors' dynamic coefficient for a cluster of `size` members in a layer of `experts`."""
    p = size / experts
    return 0.6 * (math.exp(0.5 - p) - math.exp(p - 0.5) / (math.exp(p - 0.5) + math.exp(0.5 - p))) + 0.5


def ward_clusters(signatures: np.ndarray, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels 1..k, distance of each signature to its cluster's mean signature) for [n, d] signatures."""
    distances = squareform(pdist(signatures))
    labels = fcluster(linkage(pdist(distances), method="ward"), t=clusters, criterion="maxclust")
    centres = {label: signatures[labels == label].mean(axis=0) for label in np.unique(labels)}
    to_centre = np.array([np.linalg.norm(signatures[i] - centres[label]) for i, label in enumerate(labels)])
    return labels, to_centre


def cluster_votes(signatures: np.ndarray, clusters: int, rate: float, experts: int, small: int) -> np.ndarray:
    """Votes of one batch: [n] 0/1, for the members each cluster keeps."""
    labels, to_centre = ward_clusters(signatures, clusters)
    votes = np.zeros(len(labels))
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)  # ascending index, so sorting is stable by index
        if len(members) >= small:
            ranked = members[np.argsort(to_centre[members], kind="stable")]
            members = ranked[: int(keep_coefficient(len(members), experts) * (1 - rate) * len(members))]
        votes[members] += 1
    return votes


def batched_votes(outputs: torch.Tensor, clusters: int, rate: float, experts: int, batch: int, small: int) -> np.ndarray:
    """Votes over batches of `batch` sequences; outputs [n, sequences, H] (float16)."""
    votes = np.zeros(outputs.shape[0])
    for start in range(0, outputs.shape[1], batch):
        chunk = outputs[:, start : start + batch].double().reshape(outputs.shape[0], -1).numpy()
        votes += cluster_votes(chunk, clusters, rate, experts, small)
    return votes


def signatures(layer_stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """[E, sequences, H] from the statistic's [sequences, E, H]."""
    return layer_stats["pooled_expert_outputs"].transpose(0, 1)


def _least_voted(votes: np.ndarray, count: int) -> list[int]:
    return removal_order(torch.from_numpy(votes))[:count].tolist()


def stage_rates(ratio: float, budget: str, stage1_rate: float | None) -> float:
    if stage1_rate is not None:
        if not 0.0 < stage1_rate < 1.0:
            raise MoECompressError(f"cprune: stage1_rate must be in (0, 1); got {stage1_rate}.")
        return stage1_rate
    return ratio if budget == "layer" else 1.0 - math.sqrt(1.0 - ratio)


def _explicit_rates(request: PlanRequest, limits, experts: int) -> dict[int, float]:
    """Each layer's stage-1 rate under an explicit budget: (E - count) / E, the counts checked as every method's are."""
    kept = select_experts({layer: torch.zeros(experts) for layer in request.stats}, 0.0, "explicit", limits, min_keep=request.min_keep,
                          keep=request.keep)
    return {layer: (experts - len(ids)) / experts for layer, ids in kept.items()}


def plan_cprune(
    request: PlanRequest,
    clusters: int = 12,
    global_clusters: int = 6,
    batch: int = 32,
    small: int = 3,
    stage1_rate: float | None = None,
    stage2_rate: float | None = None,
) -> Plan:
    limits = routing_limits(request.adapter, request.config)
    if limits.groups > 1:
        raise MoECompressError("cprune does not support group-limited routing (n_group > 1): use reap, mone or another criterion.")
    stats = request.stats
    experts = {layer: s["pooled_expert_outputs"].shape[1] for layer, s in stats.items()}
    if len(set(experts.values())) != 1:
        raise MoECompressError(f"cprune needs the same number of experts in every MoE layer; this model has {experts}.")
    per_layer = next(iter(experts.values()))
    if clusters >= per_layer:
        raise MoECompressError(
            f"cprune clusters each layer into {clusters} groups, but layers have only {per_layer} experts: every expert would be "
            f"its own cluster and the votes could not rank them. Pass {param('clusters')} below {per_layer}, or use another method."
        )
    if batch < 1 or small < 1 or global_clusters < 1:
        raise MoECompressError("cprune: batch, small and global_clusters must be positive.")
    rate1 = stage_rates(request.ratio, request.budget, stage1_rate) if request.ratio > 0 else 0.0
    floor = max(limits.top_k, request.min_keep)
    rates = _explicit_rates(request, limits, per_layer) if request.budget == "explicit" else {layer: rate1 for layer in stats}

    pruned: dict[int, list[int]] = {}
    votes1: dict[int, np.ndarray] = {}
    for layer, s in sorted(stats.items()):
        votes1[layer] = batched_votes(signatures(s), clusters, rates[layer], per_layer, batch, small)
        pruned[layer] = _least_voted(votes1[layer], removed_count(per_layer, rates[layer]))
    stage1 = removed_count(per_layer, rate1)
    shown = {str(layer): rate for layer, rate in sorted(rates.items())} if request.budget == "explicit" else rate1
    meta = {"clusters": clusters, "global_clusters": global_clusters, "batch": batch, "small": small, "stage1_rate": shown}

    if request.budget == "global" and request.ratio > 0:
        survivors = [(layer, e) for layer in sorted(stats) for e in range(per_layer) if e not in pruned[layer]]
        if stage2_rate is None:
            count2 = max(0, removed_count(per_layer * len(stats), request.ratio) - stage1 * len(stats))
            rate2 = count2 / len(survivors)
        else:
            rate2, count2 = stage2_rate, removed_count(len(survivors), stage2_rate)
        outputs = torch.cat([signatures(stats[layer])[[e for l, e in survivors if l == layer]] for layer in sorted(stats)])
        votes2 = batched_votes(outputs, global_clusters, rate2, per_layer, batch, small)
        cap = int(stage1 // rate1 * 0.9) if rate1 > 0 else per_layer
        chosen: dict[int, list[int]] = {layer: [] for layer in stats}
        for index in _least_voted(votes2, count2):
            layer, expert = survivors[index]
            chosen[layer].append(expert)
        for layer, extra in chosen.items():
            if stage1 + len(extra) > cap:
                extra = extra[:cap]
            pruned[layer] += extra[: max(0, per_layer - floor - len(pruned[layer]))]
        meta |= {"stage2_rate": rate2, "stage2_count": count2, "stage2_cap": cap, "stage2_votes": votes2.tolist()}

    layers = []
    for layer in sorted(stats):
        keep = sorted(set(range(per_layer)) - set(pruned[layer]))
        if len(keep) < floor:
            raise MoECompressError(
                f"cprune at ratio {request.ratio} leaves layer {layer} with {len(keep)} experts, fewer than top_k={limits.top_k}. "
                f"Use a smaller {param('ratio')}."
            )
        layers.append(KeepLayer(layer=layer, num_experts=per_layer, keep=keep, scores=votes1[layer].tolist()))
    plan = Plan(model_type=request.adapter.model_type, top_k=limits.top_k, layers=layers, method="cprune", ratio=request.ratio, budget=request.budget)
    plan.meta = {**meta, "scores": "stage-1 votes"}
    return plan


register(
    Method(
        "cprune",
        ("pooled_expert_outputs",),
        plan_cprune,
        "C-Prune as the authors' code: pooled-input signatures, Ward clustering, votes per layer then across layers",
        options={"clusters": 12, "global_clusters": 6, "batch": 32, "small": 3, "stage1_rate": None, "stage2_rate": None},
        option_help={
            "clusters": "clusters per layer in stage 1 (reference 12)",
            "global_clusters": "clusters across layers in stage 2 (reference 6)",
            "batch": "calibration sequences clustered together, each batch voting once (reference 32)",
            "small": "clusters of at most this many experts are kept whole",
            "stage1_rate": "stage-1 prune rate (default: the ratio per layer, or 1 - sqrt(1 - ratio) with a global budget)",
            "stage2_rate": "stage-2 prune rate of the survivors (default: whatever reaches the ratio)",
        },
        layer_local=True,
    )
)
