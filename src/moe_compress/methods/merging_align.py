"""Neuron alignment before merging: permute a member's intermediate neurons to match its centroid.

Two experts can compute the same function with their intermediate neurons in a different
order; averaging them unaligned blends unrelated neurons. As in REAM (SamsungSAILMontreal/ream,
`Merger._merge` with merging='logits+weights'), each member of a group is matched to the
group's first expert by a linear assignment (scipy `linear_sum_assignment`, the Hungarian
method) on a cost that adds
  * activations: Euclidean distance between the neurons' activation vectors act(gate)*up over
    sampled calibration tokens, each vector scaled to unit length;
  * weights: Euclidean distance between the neurons' weight vectors [gate row, up row,
    down column], each scaled to unit length, projected on the layer's top 64 principal
    components (over all experts' neurons), scaled to unit length again.
The result is one permutation per member (`Plan.merge_permutations`); `surgery.merge`
applies it to every fused tensor of the member before averaging.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..errors import MoECompressError
from ..slimming.observe import expert_hidden
from ..surgery.merge import NeuronAligner

Alignment = Literal["none", "weights", "activations", "activations+weights"]
ALIGNMENTS: tuple[str, ...] = ("none", "weights", "activations", "activations+weights")
PCA_DIM = 64
SAMPLE_TOKENS = 128  # per calibration batch, for activation features


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


@torch.no_grad()
def weight_features(experts: nn.Module, expert: int) -> torch.Tensor:
    """[I, 3H] (or [I, 2H] without a gate): per neuron its gate row, up row and down column."""
    aligner = NeuronAligner(experts)
    down = experts.down_proj[expert].float()
    down = down if aligner.transposed else down.T  # [I, H]
    first = (experts.gate_up_proj if aligner.gated else experts.up_proj)[expert].float()
    first = first.T if aligner.transposed else first  # [2I or I, H]
    intermediate = down.shape[0]
    if aligner.layout == "halves":
        first = first.view(2, intermediate, -1).transpose(0, 1)
    elif aligner.layout == "interleaved":
        first = first.view(intermediate, 2, -1)
    return torch.cat([first.reshape(intermediate, -1), down], dim=1)


def _pca(features: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows projected on their top `dim` principal components, scaled by the singular values."""
    rank = min(dim, *features.shape)
    centred = features - features.mean(dim=0, keepdim=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # randomized low-rank PCA: fixed seed, deterministic plans
        _, singular, basis = torch.pca_lowrank(centred, q=rank, center=False)
    return centred @ (basis[:, :rank] * singular[:rank])


def _assign(cost: torch.Tensor) -> torch.Tensor:
    """perm with perm[j] = the member neuron matched to the centroid's neuron j."""
    rows, cols = linear_sum_assignment(cost.double().numpy())
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.from_numpy(perm).long()


@torch.no_grad()
def align_groups(
    experts: nn.Module, groups: list[list[int]], alignment: Alignment, inputs: torch.Tensor | None
) -> torch.Tensor:
    """[members after the first of every group, I] permutations aligning each member to its group's first expert."""
    if alignment not in ALIGNMENTS or alignment == "none":
        raise MoECompressError(f"alignment must be one of {', '.join(ALIGNMENTS[1:])} here; got {alignment!r}.")
    pairs = [(group[0], member) for group in groups for member in group[1:]]
    intermediate = NeuronAligner(experts).intermediate
    if not pairs:
        return torch.zeros(0, intermediate, dtype=torch.long)
    involved = sorted({e for pair in pairs for e in pair})
    features: dict[str, dict[int, torch.Tensor]] = {}
    if "weights" in alignment:
        stacked = torch.stack([_unit_rows(weight_features(experts, e)) for e in involved])  # [n, I, F]
        projected = _unit_rows(_pca(stacked.flatten(0, 1), PCA_DIM).view(len(involved), intermediate, -1))
        features["weights"] = dict(zip(involved, projected))
    if "activations" in alignment:
        if inputs is None or not inputs.numel():
            raise MoECompressError("activation alignment needs sampled calibration inputs (statistic input_sample@N).")
        x = inputs.to(experts.down_proj.device, experts.down_proj.dtype)
        features["activations"] = {e: _unit_rows(expert_hidden(experts, e, x).float().T) for e in involved}
    rows = []
    for centroid, member in pairs:
        cost = sum(torch.cdist(kind[centroid], kind[member]) for kind in features.values())
        rows.append(_assign(cost.cpu()))
    return torch.stack(rows)
