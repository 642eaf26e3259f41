"""cprune-cosine: moe-compress's own reading of C-Prune, before the reference mode existed.

Why it exists: the C-Prune paper is loose about signatures, distances and keep rules; this
variant fills the gaps with choices that are cheap and scale-free (probe-token signatures,
cosine affinity, one survivor per cluster, a REAP-weighted stage 2). What it measured
(`bench/results/pruning.md`, before issue 13): on ref-deepseek at 25 % layer-wise, mean test
perplexity 94.8 against REAP's 90.1 and MoNE's 89.7; its stage-1 kept sets agree with the
authors' code only at chance level. `cprune` (methods/cprune.py) is the reference mode; this
variant stays for comparison. The description below is of this variant.

Stage 1, per layer (removes `stage1_share` of the experts to prune). For every calibration
batch, all experts run on one shared probe (the batch's first `probe_tokens` MoE inputs);
an expert's signature is its output there, affinity is the cosine of signatures, and
agglomerative clustering (scipy, `linkage`) groups functionally similar experts. Inside
each cluster the members nearest its centre (highest mean affinity to the other members) are
kept -- one per cluster by default, round-robin across clusters when `clusters` is smaller
than the number to keep -- and each kept member gets a vote. Experts with the fewest votes
over all batches are pruned (ties: lower gate mass goes first). A layer thus drops
redundancy rather than rarely used but unique experts.

Stage 2, global (removes the rest). Survivors of all layers are clustered together by the
direction of their mean output (a vector in the residual stream, so comparable across
layers) with the same linkage, into as many clusters as experts will remain. Importance is
the expert's share of its layer's REAP mass, comparable across layers. Members that are not
the most important of their global cluster are pruned first, least important first; then,
if more must go, the rest by importance. Homogeneous layers, whose experts fall into shared
clusters, therefore lose more. A layer never drops below top_k (or `min_keep`) experts, nor
loses more than `max_layer_loss` of its original experts. Its default is twice the overall
ratio, at most 0.75: with a fixed 0.75 cap, global 25 % on the 8-expert reference model cut
single layers to two experts and multiplied perplexity by up to 8x, while the mean-output
clustering saw those layers as "homogeneous".

With budget="layer", stage 2 is skipped and stage 1 removes the full ratio in every layer.
Choices where the paper is loose are the ones above; every knob is an option.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from ..errors import MoECompressError
from ..walk.moments import split_moments
from ..plan import KeepLayer, Plan
from .expert_pruning import routing_limits
from .registry import Method, PlanRequest, register

LINKAGES = ("average", "complete", "single", "weighted")


def cluster_affinity(affinity: np.ndarray, clusters: int, method: str = "average") -> np.ndarray:
    """Cluster labels 0..k-1 from a cosine-affinity matrix by agglomerative clustering."""
    if method not in LINKAGES:
        raise MoECompressError(f"unknown linkage {method!r}; choose one of {', '.join(LINKAGES)}.")
    n = affinity.shape[0]
    if clusters >= n:
        return np.arange(n)
    distance = np.clip(1.0 - (affinity + affinity.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), method=method), t=clusters, criterion="maxclust")
    return labels - 1


def representatives(affinity: np.ndarray, labels: np.ndarray, keep: int) -> list[int]:
    """`keep` members nearest their cluster centres: the best of each cluster first, round-robin."""
    ranked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        closeness = affinity[np.ix_(members, members)].mean(axis=1)
        ranked.append(list(members[np.argsort(-closeness, kind="stable")]))
    chosen: list[int] = []
    while len(chosen) < keep:
        for members in ranked:
            if members and len(chosen) < keep:
                chosen.append(int(members.pop(0)))
    return chosen


def stage_one_votes(similarities: torch.Tensor, keep: int, clusters: int, method: str) -> np.ndarray:
    """Votes per expert over calibration batches, each batch clustered on its own probe."""
    votes = np.zeros(similarities.shape[-1])
    for batch_affinity in similarities.numpy():
        labels = cluster_affinity(batch_affinity, clusters, method)
        votes[representatives(batch_affinity, labels, keep)] += 1
    return votes


def _prune_order(importance: dict[tuple[int, int], float], labels: dict[tuple[int, int], int]) -> list[tuple[int, int]]:
    """Stage-2 order: non-leaders of their global cluster first, each group least important first."""
    leaders = {}
    for key, label in labels.items():
        if label not in leaders or importance[key] > importance[leaders[label]]:
            leaders[label] = key
    leader_set = set(leaders.values())
    return sorted(importance, key=lambda k: (k in leader_set, importance[k], k))


def plan_cprune_cosine(
    request: PlanRequest,
    clusters: int = 0,
    linkage_method: str = "average",
    stage1_share: float = 0.5,
    probe_tokens: int = 64,
    max_layer_loss: float | None = None,
) -> Plan:
    limits = routing_limits(request.adapter, request.config)
    if limits.groups > 1:
        raise MoECompressError(
            "cprune-cosine does not support group-limited routing (n_group > 1) yet: use reap, mone or another criterion."
        )
    if max_layer_loss is None:
        max_layer_loss = min(0.75, 2 * request.ratio) if request.ratio > 0 else 0.75
    if not 0.0 <= stage1_share <= 1.0 or not 0.0 < max_layer_loss <= 1.0:
        raise MoECompressError("cprune-cosine needs stage1_share in [0, 1] and max_layer_loss in (0, 1].")
    stats = request.stats
    floor = max(limits.top_k, request.min_keep)
    totals = {layer: s["tokens"].numel() for layer, s in stats.items()}
    target = {layer: max(floor, round(e * (1 - request.ratio))) for layer, e in totals.items()}
    share = 1.0 if request.budget == "layer" else stage1_share
    similarity_name = f"signature_similarity@{probe_tokens}"

    kept, layer_labels, votes_out = {}, {}, {}
    for layer, s in stats.items():
        experts = totals[layer]
        keep1 = max(target[layer], experts - math.floor((experts - target[layer]) * share + 0.5))
        k = clusters if clusters > 0 else keep1
        votes = stage_one_votes(s[similarity_name], keep1, min(k, experts), linkage_method)
        gate_mass = (s["gate_sum"] / s["tokens"]).numpy()
        order = sorted(range(experts), key=lambda e: (-votes[e], -gate_mass[e], e))
        kept[layer] = sorted(order[:keep1])
        mean_affinity = s[similarity_name].mean(0).numpy()
        layer_labels[layer] = cluster_affinity(mean_affinity, min(k, experts), linkage_method).tolist()
        votes_out[layer] = votes.tolist()

    global_labels: dict[int, list[int]] = {layer: [-1] * totals[layer] for layer in stats}
    if request.budget == "global":
        survivors = [(layer, e) for layer in sorted(kept) for e in kept[layer]]
        remaining = round(sum(totals.values()) * (1 - request.ratio))
        directions, importance = [], {}
        for layer, e in survivors:
            _, mean, _ = split_moments(stats[layer]["output_moments"])
            directions.append((mean[e] / mean[e].norm().clamp_min(1e-30)).numpy())
            reap = stats[layer]["reap_sum"] / stats[layer]["selected"].clamp_min(1)
            importance[(layer, e)] = float(reap[e] / reap.sum().clamp_min(1e-30))
        directions = np.stack(directions)
        labels = cluster_affinity(directions @ directions.T, max(1, remaining), linkage_method)
        label_of = {key: int(label) for key, label in zip(survivors, labels)}
        for (layer, e), label in label_of.items():
            global_labels[layer][e] = label
        count = {layer: len(kept[layer]) for layer in kept}
        for layer, e in _prune_order(importance, label_of):
            if sum(count.values()) <= remaining:
                break
            lost = totals[layer] - count[layer]
            if count[layer] - 1 < floor or lost + 1 > max_layer_loss * totals[layer]:
                continue
            kept[layer].remove(e)
            count[layer] -= 1

    layers = [
        KeepLayer(layer=layer, num_experts=totals[layer], keep=sorted(kept[layer]), scores=votes_out[layer], clusters=layer_labels[layer])
        for layer in sorted(stats)
    ]
    plan = Plan(model_type=request.adapter.model_type, top_k=limits.top_k, layers=layers, method="cprune-cosine", ratio=request.ratio,
                budget=request.budget)
    plan.meta = {
        "clusters": clusters,
        "linkage": linkage_method,
        "stage1_share": share,
        "probe_tokens": probe_tokens,
        "max_layer_loss": max_layer_loss,
        "scores": "stage-1 votes",
        "global_clusters": {str(k): v for k, v in global_labels.items()},
    }
    return plan


register(
    Method(
        "cprune-cosine",
        lambda options: ("gate_sum", "selected", "reap_sum", "output_moments", f"signature_similarity@{options['probe_tokens']}"),
        plan_cprune_cosine,
        "moe-compress's earlier C-Prune: probe signatures, cosine clustering, one survivor per cluster",
        options={"clusters": 0, "linkage_method": "average", "stage1_share": 0.5, "probe_tokens": 64, "max_layer_loss": None},
        option_help={
            "clusters": "clusters per layer (0: as many as experts kept)",
            "linkage_method": "agglomerative linkage: average, complete, single or weighted",
            "stage1_share": "share of the removal done per layer in stage 1; the rest is global (stage 2)",
            "probe_tokens": "tokens per batch in the shared probe that defines expert signatures",
            "max_layer_loss": "most any layer may lose in stage 2, as a fraction of its experts (default: twice the ratio, at most 0.75)",
        },
        explicit_budget=False,
    )
)
