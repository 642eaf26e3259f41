"""Residual-stream similarities for layer drop and block drop, in one sequential pass.

  * MoE sub-layer l: S_l = mean_t cos(h_t, h_t + MoE_l(norm(h_t))), with h the residual
    stream entering the MoE sub-layer (the input of the family's pre-MoE norm) and
    h + MoE(...) the decoder layer's output -- so residual multipliers (Granite) are included.
  * Blocks: h_0..h_L at block boundaries; mean_t cos(h_i, h_{i+d}) for every distance
    d <= max_distance (d = 1 for "discrete" block drop, d = n for a consecutive run of n).

Cosines are per token over the hidden dimension, averaged over all calibration tokens. Only
the last max_distance boundaries are kept per batch, never every layer's activations.
"""

from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..arch.adapter import MoEAdapter
from ..source.residency import Weights
from .observer import run_sequential


@dataclass
class Similarities:
    moe: dict[int, float] = field(default_factory=dict)  # MoE layer -> S_l
    blocks: dict[int, list[float]] = field(default_factory=dict)  # distance d -> [cos(h_i, h_{i+d}) for i]


def _cos_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return float(F.cosine_similarity(a, b, dim=-1).sum()), a.shape[0]


@torch.no_grad()
def observe_similarities(
    model: nn.Module, adapter: MoEAdapter, batches: list[torch.Tensor], max_distance: int = 1, weights: Weights | None = None, device: str = "cpu"
) -> Similarities:
    num_layers = len(adapter.decoder_layers(model))
    moe_sums: dict[int, list[float]] = {}
    block_sums = {d: [[0.0, 0] for _ in range(num_layers + 1 - d)] for d in range(1, max_distance + 1)}
    history: list[deque] = [deque(maxlen=max_distance + 1) for _ in batches]
    moe_layers = set(adapter.moe_layer_indices(model))

    @contextmanager
    def layer_context(index: int, layer: nn.Module):
        position = {"batch": 0}
        residual: list[torch.Tensor] = []

        def before_layer(_module, args, kwargs):
            if index == 0:
                history[position["batch"]].append(args[0].detach().cpu())

        def entering_moe(_module, args, kwargs):
            residual[:] = [(args[0] if args else next(iter(kwargs.values()))).detach()]

        def after_layer(_module, _args, output):
            out = (output[0] if isinstance(output, tuple) else output).detach()
            b = position["batch"]
            if index in moe_layers and residual[0].shape == out.shape:  # hyper-connections: several streams out, one in
                total, count = _cos_sum(residual[0], out)
                entry = moe_sums.setdefault(index, [0.0, 0])
                entry[0], entry[1] = entry[0] + total, entry[1] + count
            past = history[b]
            for d in range(1, min(max_distance, len(past)) + 1):
                total, count = _cos_sum(past[-d], out.cpu())
                start = index + 1 - d
                block_sums[d][start][0] += total
                block_sums[d][start][1] += count
            past.append(out.cpu())
            position["batch"] += 1

        handles = [layer.register_forward_pre_hook(before_layer, with_kwargs=True), layer.register_forward_hook(after_layer)]
        if index in moe_layers:
            # The residual stream entering the MoE is the input of its pre-norm; layers without one
            # (post-norm: FlexOlmo; hyper-connections: Qwen4) hand the stream to the MoE block itself.
            entry = getattr(layer, adapter.pre_moe_norm_attr) if adapter.pre_moe_norm_attr else adapter.moe_block(layer)
            handles.append(entry.register_forward_pre_hook(entering_moe, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    distributed.check_shareable(len(batches))
    run_sequential(model, adapter, distributed.shard(batches), layer_context, device, description="scoring layers", weights=weights)
    for sums in [*moe_sums.values(), *(entry for per_distance in block_sums.values() for entry in per_distance)]:
        sums[:] = distributed.all_reduce_sum_(torch.tensor(sums, dtype=torch.float64)).tolist()
    return Similarities(
        moe={layer: total / count for layer, (total, count) in sorted(moe_sums.items())},
        blocks={d: [total / count for total, count in sums] for d, sums in block_sums.items()},
    )
