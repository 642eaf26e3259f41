"""Calibration routed to every expert, for the statistics of stages that treat each expert by its tokens.

A routed expert only sees the calibration tokens its router sends it. An expert the router never
picks on the calibration text gets no statistics, and whatever the stage does to it (Wanda's
activation norms, SparseGPT's Hessian) falls back to a data-free rule; the quality guard then
names it (`evaluate.guard`). With `calibrate_all_experts`, every expert sees every calibration
token during the statistics pass instead.

What others do (read in their sources, not copied):
  * GPTQModel (ModelCloud/GPTQModel) offers two settings in `QuantizeConfig(moe=MoEConfig(routing=...))`
    (gptqmodel/quantization/config.py). `ExpertsRoutingOverride(num_experts_per_tok="all")` sets
    each router's top-k attribute to the number of experts for the calibration forward of a decoder
    layer (gptqmodel/looper/module_looper.py, `MoERoutingOverrideContext`, via `set_moe_topk` in
    gptqmodel/utils/model.py) and restores it afterwards; the "replay" forward that produces the
    next layer's inputs runs with the native router (gptqmodel/looper/stage_layer.py passes
    `apply_moe_config=False`: "Replay should emit next-layer activations under the model's native
    router"). `ExpertsRoutingBypass()` instead forwards the whole calibration batch through each
    expert with per-family hooks (gptqmodel/models/moe_lifecycle.py, `forward_to_all_experts`).
  * llm-compressor's MoE calibration modules (`calibrate_all_experts`) run every expert on every
    token while only the routed experts' outputs, with their gate weights, form the layer's output.

Here it is the second kind: the experts module receives a dense routing -- every expert for every
token, each weighted by its native router weight, 0 where the router did not pick it. The
statistics hooks (`slimming.observe`) then see every token for every expert, and the layer's
output is its own (the added experts are multiplied by 0; only the order of the sum changes, so
it agrees to rounding), so later layers calibrate on the model's real activations and the saved
model's routing is untouched. As in both tools, an expert's statistics then come from all the
layer's tokens rather than from its routed tokens alone: that is the price of giving it any.

A zero-weighted route gives statistics but no gradient. For a method that tunes against the
layer's output (AutoRound, `slimming.autoround_experts`), `even_routing` weights every expert
alike instead: each gets an equal share of the token's routed weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .experts_forward import experts_count, routing_arguments

_ROUTING_KEYWORDS = ("hidden_states", "top_k_index", "top_k_weights", "router_indices", "routing_weights")


def dense_routing(top_index: torch.Tensor, top_weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert for every token: ([N, E] expert ids 0..E-1, [N, E] the router's weight of each, 0 where it was not picked).

    `top_index` [N, k] (or [..., k]) may name an expert more than once only if the router did; its weights then add up."""
    index = top_index.reshape(-1, top_index.shape[-1]).long()
    weights = torch.zeros(index.shape[0], num_experts, dtype=top_weights.dtype, device=top_weights.device)
    weights.scatter_add_(1, index, top_weights.reshape(index.shape))
    every = torch.arange(num_experts, device=index.device, dtype=top_index.dtype).expand(index.shape[0], num_experts)
    return every, weights


def even_routing(top_index: torch.Tensor, top_weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert for every token, weighted alike: ([N, E] expert ids 0..E-1, [N, E] each 1/E of the total of the
    token's routed weights), so the layer's expert output keeps its scale (a routed scaling factor included)."""
    index = top_index.reshape(-1, top_index.shape[-1])
    share = top_weights.reshape(index.shape).sum(-1, keepdim=True) / num_experts
    every = torch.arange(num_experts, device=index.device, dtype=top_index.dtype).expand(index.shape[0], num_experts)
    return every, share.expand(-1, num_experts).contiguous()


Routing = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def routing_width(experts: nn.Module) -> int:
    """The experts a routing of `experts` names: its count, or for our novice classes the router rows (more than the kept experts)."""
    slot = getattr(experts, "expert_slot", None)
    return experts_count(experts) if slot is None else len(slot)


def _rerouted(routing: Routing, width: int | None = None):
    """A forward pre-hook passing the experts call `routing`'s (index, weights) by position; `width`: the experts
    it names (None: `routing_width` of the module, which needs its fused tensors)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden, top_index, top_weights = routing_arguments(args, kwargs)
        every, weights = routing(top_index, top_weights, routing_width(module) if width is None else width)
        rest = {k: v for k, v in kwargs.items() if k not in _ROUTING_KEYWORDS}
        return (hidden, every, weights), rest

    return hook


def route_to_every_expert(experts: nn.Module):
    """Install the dense-routing pre-hook on `experts` (an experts module called as (hidden, top-k index, top-k weights));
    returns its handle. Install it before any hook that reads the routing, so they see the dense one."""
    return experts.register_forward_pre_hook(_rerouted(dense_routing), with_kwargs=True)


@contextmanager
def routed_evenly(experts: list[tuple[nn.Module, int]]) -> Iterator[None]:
    """Within the block, each experts module of `experts` (with the experts its routing names: `routing_width`,
    taken before the module was changed) receives `even_routing` instead of its router's choice."""
    handles = [module.register_forward_pre_hook(_rerouted(even_routing, width), with_kwargs=True) for module, width in experts]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
