"""An experts forward that hands its per-expert outputs to the observer instead of discarding them.

Statistics such as REAP or MoNE's output moments need f_e(x_t), each routed expert's output
before gating. The model's own experts forward computes exactly these -- and then discards
them after weighting and summing. Hooks around it would have to compute them a second time
(26-39 % of calibration time in the measurements that motivated this module). Instead, while
a layer is observed its experts module runs `grouped_outputs` below: the same operations
as transformers' `grouped_mm` experts implementation (pairs sorted by expert, one grouped
matmul per projection, the family's own gate, biases and post-expert norm), which also
returns the unweighted outputs. The layer's result is the same as with that implementation;
the statistics read the outputs for free.

Only the standard transformers experts module (decorated with `use_experts_implementation`)
is replaced; anything else (our generated novice/condensed classes) keeps its forward and the
observer computes the outputs itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

_ROUTING_NAMES = ("hidden_states", "top_k_index", "top_k_weights")


def routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top-k expert index, top-k weights) from an experts call, by position or keyword.

    gpt_oss names the last two `router_indices` / `routing_weights`: unknown keywords fill in, in order.
    """
    values = list(args) + [kwargs[n] for n in _ROUTING_NAMES[len(args) :] if n in kwargs]
    if len(values) < 3:
        values += [v for k, v in kwargs.items() if k not in _ROUTING_NAMES]
    return values[0], values[1], values[2]


def is_standard_experts(experts: nn.Module) -> bool:
    """The fused experts module transformers' `use_experts_implementation` decorates (and we did not subclass)."""
    kind = type(experts)
    return (
        hasattr(experts, "is_transposed")
        and hasattr(kind.forward, "__wrapped__")
        and not hasattr(kind, "_novice_base")
        and not hasattr(kind, "_condensed_base")
    )


def grouped_outputs(
    experts: nn.Module, x: torch.Tensor, order: torch.Tensor, expert_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f_e(x_t) for pairs sorted by expert, and each pair's down-projection input act(gate) * up.

    `x` [N, H] tokens, `order` the sorting permutation of the flattened [N, k] routing,
    `expert_ids` the sorted expert of each pair. Returns ([N*k, H], [N*k, I])."""
    from transformers.integrations.moe import _grouped_linear

    top_k = order.numel() // x.shape[0]
    tokens = x[order // top_k]
    offsets = torch.cumsum(torch.bincount(expert_ids, minlength=experts_count(experts)), dim=0).to(torch.int32)
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    bias = getattr(experts, f"{first}_bias")[expert_ids] if experts.has_bias else None
    hidden = _grouped_linear(tokens, getattr(experts, first), offsets, bias=bias, is_transposed=experts.is_transposed)
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
    bias = experts.down_proj_bias[expert_ids] if experts.has_bias else None
    out = _grouped_linear(hidden, experts.down_proj, offsets, bias=bias, is_transposed=experts.is_transposed)
    return (experts.post_expert_norm(out) if experts.has_post_expert_norm else out), hidden


def experts_count(experts: nn.Module) -> int:
    return int(experts.down_proj.shape[0])


@dataclass
class ExpertPass:
    """One experts call as the capturing forward saw it; pairs are (token, slot) sorted by expert."""

    x: torch.Tensor  # [N, H] tokens
    top_idx: torch.Tensor  # [N, k]
    top_w: torch.Tensor  # [N, k]
    order: torch.Tensor  # [N*k] sorting permutation of the flattened routing
    expert_ids: torch.Tensor  # [N*k] expert of each sorted pair
    outputs: torch.Tensor  # [N*k, H] f_e(x_t)
    hidden: torch.Tensor  # [N*k, I] down-projection inputs act(gate) * up
    num_experts: int

    @property
    def counts(self) -> torch.Tensor:
        """Routed pairs per expert, [E]."""
        return torch.bincount(self.expert_ids, minlength=self.num_experts)

    @property
    def tokens(self) -> torch.Tensor:
        """[N*k, H] the token of each sorted pair (the up-projection inputs)."""
        return self.x[self.order // self.top_idx.shape[-1]]


@contextmanager
def capturing(experts: nn.Module, record: Callable[[ExpertPass], None]):
    """While active, `experts` computes with `grouped_outputs` and calls `record(ExpertPass)` on every call."""

    def forward(*args, **kwargs):
        hidden_states, top_idx, top_w = routing_arguments(args, kwargs)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        order = torch.sort(top_idx.reshape(-1), stable=True).indices
        expert_ids = top_idx.reshape(-1)[order].long()
        outputs, hidden = grouped_outputs(experts, x, order, expert_ids)
        record(ExpertPass(x, top_idx, top_w, order, expert_ids, outputs, hidden, experts_count(experts)))
        weighted = outputs * top_w.reshape(-1)[order].unsqueeze(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return weighted[inverse].view(x.shape[0], top_idx.shape[-1], -1).sum(dim=1).to(hidden_states.dtype)

    experts.forward = forward
    try:
        yield
    finally:
        del experts.forward
