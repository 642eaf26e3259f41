"""Expert merging: what HC-SMoE, M-SMoE and REAM share, and the first two methods.

Every merging method decides, per MoE layer, a set of *representatives* (as many as the
budget keeps) and assigns other experts to them; each group becomes one expert, the weighted
average of its members (optionally neuron-aligned first), with router rows combined the same
way or taken from the representative. Unlike the public HC-SMoE and M-SMoE code, which points
merged experts at one shared module and keeps every router row, the result here really has
fewer experts (`surgery.merge`): a uniform merge saves as a stock checkpoint.

Budgets and routing groups are the pruning ones (`budget.select_experts`): the number of
representatives per layer (and per routing group for DeepSeek-V3/GLM group-limited routers,
whose groups keep equal sizes) is what pruning by the method's importance score would keep,
layer-wise or global; experts only merge within their routing group, so merged router rows
and correction biases stay in their group. Super experts (`super_experts`) are forced into
the representatives and kept as singletons.

HC-SMoE (Chen et al., ICML 2025; wazenmai/HC-SMoE, defaults of its scripts): an expert's
signature is its mean output over *all* calibration tokens (every expert runs on every token);
per layer, hierarchical clustering with average linkage on Euclidean distances cuts the
experts into as many clusters as are kept; each cluster is averaged with weights = routing
frequency (top-k selections), its representative is the member nearest the cluster mean, and
its router row is the same frequency-weighted average. The global budget sets each layer's
cluster count from routing frequency, as the code's `dynamic_group` does.

M-SMoE (Li et al., ICLR 2024; UNITES-Lab/MC-SMoE, `msmoe-merging-mixtral.py`): the dominant
experts are the most frequently routed ones (as many as are kept; globally by a frequency
threshold); every other expert joins the dominant expert whose router-logit column is most
similar (cosine over calibration tokens); groups are averaged with routing-frequency weights.
The Mixtral script does not align neurons (the Switch-Transformer pipeline does, by weight
matching): `align` is an option, off by default.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage

from ..errors import MoECompressError
from ..plan import MergeLayer, Plan
from .budget import select_experts
from .expert_pruning import routing_limits
from .merging_align import ALIGNMENTS, SAMPLE_TOKENS, align_groups
from .registry import Method, PlanRequest, register

Groups = list[list[int]]


def _group_size(request: PlanRequest, num_experts: int) -> int:
    return num_experts // routing_limits(request.adapter, request.config).groups


def representatives(request: PlanRequest, scores: dict[int, torch.Tensor], normalise: bool) -> dict[int, list[int]]:
    """Per layer, the experts that stay (as group heads): the budget's count per routing group,
    super experts first, then the highest scores."""
    limits = routing_limits(request.adapter, request.config)
    kept = select_experts(scores, request.ratio, request.budget, limits, normalise, request.min_keep, request.keep)
    chosen = {}
    for layer, s in scores.items():
        size = s.numel() // limits.groups
        protected = set(request.protected.get(layer, []))
        heads = []
        for g in range(limits.groups):
            members = range(g * size, (g + 1) * size)
            count = sum(1 for e in kept[layer] if e in members)
            forced = [e for e in members if e in protected]
            if len(forced) > count:
                raise MoECompressError(f"layer {layer} has {len(forced)} super experts in a routing group that keeps {count}; lower the ratio.")
            ranked = sorted((e for e in members if e not in protected), key=lambda e: (-float(s[e]), e))
            heads += forced + ranked[: count - len(forced)]
        chosen[layer] = sorted(heads)
    return chosen


def same_routing_group(request: PlanRequest, num_experts: int, a: int, b: int) -> bool:
    size = _group_size(request, num_experts)
    return a // size == b // size


def frequency(layer_stats: dict[str, torch.Tensor]) -> torch.Tensor:
    return layer_stats["selected"].double() / layer_stats["tokens"].double()


def group_weights(groups: Groups, weights: torch.Tensor) -> list[list[float]]:
    """Each group's members' weights; a group whose weights are all zero averages uniformly."""
    out = []
    for group in groups:
        w = [float(weights[e]) for e in group]
        out.append(w if sum(w) > 0 else [1.0] * len(group))
    return out


def build_plan(
    request: PlanRequest,
    method: str,
    groups: dict[int, Groups],
    weights: dict[int, torch.Tensor],
    scores: dict[int, torch.Tensor],
    merge_router: str,
    alignment: str,
    meta: dict,
) -> Plan:
    """The Plan for merge groups (representative first): layers sorted, groups in ascending
    representative order, neuron permutations computed for the final order."""
    limits = routing_limits(request.adapter, request.config)
    layers = []
    for layer, layer_groups in sorted(groups.items()):
        ordered = sorted((g for g in layer_groups), key=lambda g: g[0])
        layers.append(
            MergeLayer(
                layer=layer, num_experts=scores[layer].numel(), keep=[g[0] for g in ordered], scores=[float(v) for v in scores[layer]],
                merges=ordered, merge_weights=group_weights(ordered, weights[layer]), merge_router=merge_router,
            )
        )
    plan = Plan(
        model_type=request.adapter.model_type, top_k=limits.top_k, layers=layers, method=method, ratio=request.ratio, budget=request.budget,
        routing_groups=limits.groups, groups_per_token=limits.groups_per_token, min_per_group=limits.min_per_group,
        meta={**meta, "align": alignment},
    )
    if alignment != "none":
        plan.merge_permutations = neuron_permutations(request, plan, alignment)
    return plan


def neuron_permutations(request: PlanRequest, plan: Plan, alignment: str) -> dict[int, torch.Tensor]:
    """Per layer, the permutations aligning every merged member to its representative (one layer of weights at a time)."""
    if alignment not in ALIGNMENTS:
        raise MoECompressError(f"align must be one of {', '.join(ALIGNMENTS)}; got {alignment!r}.")
    if request.model is None:
        raise MoECompressError("neuron alignment reads expert weights: pass the model in the PlanRequest (compress does).")
    adapter = request.adapter
    layers = adapter.decoder_layers(request.model)
    sample = f"input_sample@{SAMPLE_TOKENS}"
    result = {}
    for lp in plan.layers:
        experts = adapter.experts(adapter.moe_block(layers[lp.layer]))
        with request.weights.loaded(experts) if request.weights is not None else nullcontext(experts) as resident:
            result[lp.layer] = align_groups(resident, lp.merges, alignment, request.stats[lp.layer].get(sample))
    return result


ALIGN_HELP = "align merged experts' neurons first: none, weights, activations or activations+weights"


def alignment_statistics(alignment: str) -> tuple[str, ...]:
    return (f"input_sample@{SAMPLE_TOKENS}",) if "activations" in alignment else ()


# ---- HC-SMoE --------------------------------------------------------------------------------
def cluster_outputs(signatures: torch.Tensor, clusters: int) -> list[list[int]]:
    """Average-linkage hierarchical clustering (Euclidean) into exactly `clusters` clusters,
    each listed with its member nearest the cluster mean first (HC-SMoE's representative)."""
    n = signatures.shape[0]
    if clusters >= n:
        return [[i] for i in range(n)]
    points = signatures.double().numpy()
    labels = cut_tree(linkage(points, method="average", metric="euclidean"), n_clusters=clusters).reshape(-1)
    groups = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        centre = points[members].mean(axis=0)
        nearest = int(members[np.argmin(np.linalg.norm(points[members] - centre, axis=1))])
        groups.append([nearest] + [int(m) for m in members if m != nearest])
    return groups


def plan_hc_smoe(request: PlanRequest, align: str = "none") -> Plan:
    scores = {layer: frequency(s) for layer, s in request.stats.items()}
    heads = representatives(request, scores, normalise=False)
    groups = {}
    for layer, s in request.stats.items():
        signatures = s["output_sum_all"] / s["tokens"][0]
        num_experts = scores[layer].numel()
        size = _group_size(request, num_experts)
        protected = set(request.protected.get(layer, []))
        layer_groups = []
        for start in range(0, num_experts, size):
            members = [e for e in range(start, start + size) if e not in protected]
            count = sum(1 for e in heads[layer] if start <= e < start + size and e not in protected)
            layer_groups += [[e] for e in range(start, start + size) if e in protected]
            if count:
                layer_groups += [[members[i] for i in cluster] for cluster in cluster_outputs(signatures[members], count)]
        groups[layer] = layer_groups
    return build_plan(request, "hc-smoe", groups, scores, scores, "weighted", align,
                      {"signature": "mean output over all tokens", "linkage": "average", "weights": "frequency"})


# ---- M-SMoE ---------------------------------------------------------------------------------
def logit_cosine(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of router-logit columns over calibration tokens, from sum_t z z^T."""
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norms[:, None] / norms[None, :]


def attach_to_heads(request: PlanRequest, num_experts: int, heads: list[int], similarity: torch.Tensor, protected: set[int]) -> Groups:
    """Each non-head joins the most similar unprotected head of its routing group (ties: lower id).
    An expert whose routing group has no such head is dropped."""
    groups = {h: [h] for h in heads}
    for e in range(num_experts):
        if e in groups:
            continue
        candidates = [h for h in heads if h not in protected and same_routing_group(request, num_experts, h, e)]
        if candidates:
            groups[max(candidates, key=lambda h: (float(similarity[e, h]), -h))].append(e)
    return list(groups.values())


def plan_m_smoe(request: PlanRequest, align: str = "none") -> Plan:
    scores = {layer: frequency(s) for layer, s in request.stats.items()}
    heads = representatives(request, scores, normalise=False)
    groups = {
        layer: attach_to_heads(request, scores[layer].numel(), heads[layer], logit_cosine(s["logit_gram"]), set(request.protected.get(layer, [])))
        for layer, s in request.stats.items()
    }
    return build_plan(request, "m-smoe", groups, scores, scores, "weighted", align,
                      {"dominant": "frequency", "similarity": "router-logit cosine", "weights": "frequency"})


register(
    Method(
        "hc-smoe",
        lambda o: ("selected", "output_sum_all", *alignment_statistics(o["align"])),
        plan_hc_smoe,
        "merge clusters of experts with similar mean outputs (hierarchical clustering), frequency-weighted (HC-SMoE)",
        options={"align": "none"},
        option_help={"align": ALIGN_HELP},
        protects=True,
        family="merging",
    )
)
register(
    Method(
        "m-smoe",
        lambda o: ("selected", "logit_gram", *alignment_statistics(o["align"])),
        plan_m_smoe,
        "merge each expert into the most-used expert with the most similar router logits, frequency-weighted (M-SMoE)",
        options={"align": "none"},
        option_help={"align": ALIGN_HELP},
        protects=True,
        family="merging",
    )
)
