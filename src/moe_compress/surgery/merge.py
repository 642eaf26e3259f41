"""Expert merging surgery for one MoE layer: weighted averages of experts, router rows combined.

A merge plan says, for each kept expert, which original experts it absorbs and with what
weights (`MergeLayer.merges` / `merge_weights`), and optionally how to permute each absorbed
expert's intermediate neurons first (`Plan.merge_permutations`). The merged tensors are
computed here from the layer's own original weights, so the surgery needs nothing but the
layer and the plan. The result has fewer experts in the family's usual layout: a uniform
merge is a stock checkpoint, exactly like pruning.

Sums run in float64 and are cast back once, so merging identical experts reproduces them bit
for bit; a group of one is copied, not recomputed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..arch.adapter import ExpertTensor, MoEAdapter
from ..errors import MoECompressError
from ..plan import MergeLayer

#: Expert tensors whose second axis (of one expert's slice) indexes intermediate neurons in the
#: stored orientation, and those whose last axis does; the rest (down_proj_bias) has none.
_GATE_UP = ("gate_up_proj", "gate_up_proj_bias", "up_proj", "up_proj_bias")


def _gate_layout(experts: nn.Module, intermediate: int) -> str:
    """How gate and up halves share the fused projection: 'halves' ([gate; up]) or 'interleaved'.

    Found by testing which layout makes the family's own `_apply_gate` commute with a neuron
    permutation, so no family needs to declare it (gpt_oss interleaves, the others concatenate).
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2 * intermediate, generator=generator)
    perm = torch.randperm(intermediate, generator=generator)
    reference = experts._apply_gate(x)[:, perm]
    for layout in ("halves", "interleaved"):
        if torch.allclose(experts._apply_gate(x[:, _fused_index(perm, intermediate, layout)]), reference):
            return layout
    raise MoECompressError(f"{type(experts).__name__}: cannot tell how its gate and up projections are fused, so its neurons cannot be aligned.")


def _fused_index(perm: torch.Tensor, intermediate: int, layout: str) -> torch.Tensor:
    """Index into a fused gate/up axis of size 2I that applies neuron permutation `perm` to both halves."""
    if layout == "halves":
        return torch.cat([perm, perm + intermediate])
    return torch.stack([2 * perm, 2 * perm + 1], dim=1).reshape(-1)


class NeuronAligner:
    """Applies a neuron permutation to one expert's slice of each fused expert tensor."""

    def __init__(self, experts: nn.Module):
        self.transposed = bool(getattr(experts, "is_transposed", False))
        self.gated = bool(getattr(experts, "has_gate", True)) and hasattr(experts, "gate_up_proj")
        self.intermediate = int(experts.down_proj.shape[1 if self.transposed else 2])
        self.layout = _gate_layout(experts, self.intermediate) if self.gated else "single"

    def permute(self, name: str, value: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        """`value` is one expert's slice of tensor `name`; returns it with neurons reordered by `perm`."""
        if name == "down_proj":
            return value.index_select(0 if self.transposed else 1, perm)
        if name == "down_proj_bias":
            return value
        if name not in _GATE_UP:
            raise MoECompressError(f"expert tensor {name!r} has no known neuron axis, so this family's experts cannot be aligned.")
        index = _fused_index(perm, perm.numel(), self.layout) if self.gated else perm
        axis = 0 if name.endswith("_bias") or not self.transposed else 1
        return value.index_select(axis, index)


def _weighted(slices: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    total = sum(w * s.double() for w, s in zip(weights.tolist(), slices))
    return total.to(slices[0].dtype)


def _normalised(weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    return w / w.sum()


def merged_tensors(
    adapter: MoEAdapter, block: nn.Module, lp: MergeLayer, permutations: torch.Tensor | None, routed: int
) -> Iterator[tuple[ExpertTensor, torch.Tensor]]:
    """(tensor, its new value with one slice per kept expert) for every expert and router tensor.

    Slices past the `routed` experts (a router's rows for shared experts) are not experts: they
    stay, after the merged ones.

    Expert tensors: kept expert i is the weighted average of its group (aligned members);
    router tensors: the same weighted average of the group's rows, or the kept expert's own
    row (`merge_router="centroid"`).
    """
    aligner = NeuronAligner(adapter.experts(block)) if permutations is not None and permutations.numel() else None
    if aligner is not None and permutations.shape[1] != aligner.intermediate:
        raise MoECompressError(
            f"layer {lp.layer}: the plan's neuron permutations have {permutations.shape[1]} neurons; its experts have {aligner.intermediate}."
        )
    perms: list[list[torch.Tensor | None]] = []
    row = 0
    for group in lp.merges:
        members = [None] + [permutations[row + j].long() if aligner else None for j in range(len(group) - 1)]
        row += len(group) - 1
        perms.append(members)
    weights = [_normalised(w) for w in lp.merge_weights]

    for tensor in adapter.routed_expert_tensors(block):
        value = tensor.value
        slices = []
        for group, w, group_perms in zip(lp.merges, weights, perms):
            if len(group) == 1:
                slices.append(value[group[0]])
                continue
            members = [value[e] if p is None else aligner.permute(tensor.name, value[e], p.to(value.device)) for e, p in zip(group, group_perms)]
            slices.append(_weighted(members, w))
        yield tensor, torch.cat([torch.stack(slices), value[routed:]]).contiguous()

    for tensor in adapter.router_tensors(block):
        value = tensor.value
        rows = []
        for group, w in zip(lp.merges, weights):
            if len(group) == 1 or lp.merge_router == "centroid":
                rows.append(value.select(tensor.axis, group[0]))
            else:
                rows.append(_weighted([value.select(tensor.axis, e) for e in group], w))
        extra = value.narrow(tensor.axis, routed, value.shape[tensor.axis] - routed)
        yield tensor, torch.cat([torch.stack(rows, dim=tensor.axis), extra], dim=tensor.axis).contiguous()
