"""REAM: merge experts into the most salient ones, with neuron alignment (Jha et al., 2026).

Follows the authors' code (SamsungSAILMontreal/ream, `Merger` with its defaults: saliency
'reap', grouping 'ream', merging 'logits+weights', group_size C=16, gate outputs and gated
similarity on):
  * centroids: the experts with the highest REAP saliency, as many as the budget keeps;
  * similarity of experts i, j: the mean of (cos(o_i, o_j) + 1) / 2, where o_e is expert e's
    output times its router probability averaged over *all* calibration tokens, and
    1 - d_ij / max d, where d is the Euclidean distance between the unit-normalised columns
    of router logits over the tokens;
  * pseudo-grouping: centroids in descending saliency each take the up-to C-1 most similar
    experts not yet assigned (not centroids), so most groups stay single ("pseudo-pruning")
    and a few grow; `group_size=0` instead sends every expert to its most similar centroid
    (the MC-SMoE rule). Experts still unassigned when the centroids run out join their most
    similar centroid (the authors' code asserts that this cannot happen);
  * each member is neuron-aligned to its centroid (`merging_align`), and the group averaged
    with weights = saliency (zero saliencies raised to min(0.5, smallest non-zero), as the
    authors do, so unused experts still merge); router rows are the centroid's.
Where we differ from that code, on purpose: saliency is our REAP criterion (mean over routed
tokens of the gate as the model applies it times the output norm); with gated similarity on,
the authors' code multiplies the output by the router probability before computing REAP,
which squares the gate. The authors' default also re-observes each layer after merging the
previous ones ("sequential"); here one observation pass of the original model feeds every
layer, like the other methods (the authors' --no_sequential), so statistics can be cached.
"""

from __future__ import annotations

import torch

from ..errors import MoECompressError
from ..plan import Plan
from .criteria import CRITERIA, layer_scores
from .merging import ALIGN_HELP, Groups, alignment_statistics, build_plan, logit_cosine, representatives, same_routing_group
from .registry import Method, PlanRequest, register


def ream_distance(layer_stats: dict[str, torch.Tensor], use_gate: bool = True) -> torch.Tensor:
    """[E, E] distances 1 - similarity between experts, as REAM's pseudo-grouping uses them."""
    outputs = layer_stats["gated_output_sum_all"].double()
    unit = outputs / outputs.norm(dim=1, keepdim=True).clamp_min(1e-30)
    similarity = (unit @ unit.T + 1) / 2
    if use_gate:
        gate = (2 - 2 * logit_cosine(layer_stats["logit_gram"].double())).clamp_min(0).sqrt()
        similarity = (similarity + 1 - gate / gate.max().clamp_min(1e-30)) / 2
    return 1 - similarity


def pseudo_groups(
    request: PlanRequest, saliency: torch.Tensor, centroids: list[int], distance: torch.Tensor, group_size: int, protected: set[int]
) -> Groups:
    """REAM's pseudo-grouping (see the module docstring); experts merge only within their routing group."""
    n = saliency.numel()
    groups = {c: [c] for c in centroids}
    assigned = set(centroids)
    open_centroids = [c for c in sorted(centroids, key=lambda c: (-float(saliency[c]), c)) if c not in protected]
    if group_size > 0:
        for centroid in open_centroids:
            for e in sorted(range(n), key=lambda e: (float(distance[centroid, e]), e)):
                if len(groups[centroid]) >= group_size:
                    break
                if e not in assigned and same_routing_group(request, n, centroid, e):
                    groups[centroid].append(e)
                    assigned.add(e)
    for e in range(n):
        candidates = [c for c in open_centroids if same_routing_group(request, n, c, e)]
        if e not in assigned and candidates:
            groups[min(candidates, key=lambda c: (float(distance[c, e]), c))].append(e)
    return list(groups.values())


def merge_saliency(saliency: torch.Tensor) -> torch.Tensor:
    """Saliency as merge weights: zeros raised to min(0.5, smallest non-zero) so unused experts still merge."""
    positive = saliency[saliency > 0]
    if not positive.numel():
        return torch.ones_like(saliency)
    return torch.where(saliency > 0, saliency, torch.full_like(saliency, min(0.5, float(positive.min()))))


def plan_ream(request: PlanRequest, group_size: int = 16, use_gate: bool = True, align: str = "activations+weights") -> Plan:
    if group_size < 0:
        raise MoECompressError(f"group_size must be >= 0 (0: MC-SMoE-style grouping); got {group_size}.")
    saliency = layer_scores("reap", request.stats)
    heads = representatives(request, saliency, normalise=CRITERIA["reap"].normalise_globally)
    groups, weights = {}, {}
    for layer, s in request.stats.items():
        protected = set(request.protected.get(layer, []))
        groups[layer] = pseudo_groups(request, saliency[layer], heads[layer], ream_distance(s, use_gate), group_size, protected)
        weights[layer] = merge_saliency(saliency[layer])
    return build_plan(request, "ream", groups, weights, saliency, "centroid", align,
                      {"saliency": "reap", "group_size": group_size, "use_gate": use_gate, "weights": "saliency"})


register(
    Method(
        "ream",
        lambda o: ("reap_sum", "selected", "gated_output_sum_all", *(("logit_gram",) if o["use_gate"] else ()), *alignment_statistics(o["align"])),
        plan_ream,
        "merge experts into the highest-REAP centroids after aligning their neurons; router rows from the centroids (REAM)",
        options={"group_size": 16, "use_gate": True, "align": "activations+weights"},
        option_help={
            "group_size": "most experts per merge group (pseudo-pruning); 0 sends every expert to its most similar centroid",
            "use_gate": "similarity averages gated outputs with router logits (true) or uses the gated outputs alone (false)",
            "align": ALIGN_HELP,
        },
        protects=True,
        family="merging",
    )
)
