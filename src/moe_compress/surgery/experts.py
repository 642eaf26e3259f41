"""Expert pruning surgery: slice routed experts, router rows and correction biases.

Pure tensor slicing: kept experts keep their weights bit for bit and their relative order,
so the router's top-k among the kept experts picks what it picked before whenever the
original choice survives.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import ExpertTensor, MoEAdapter, text_config
from ..arch.registry import get_adapter
from ..errors import MoECompressError
from ..io.export import note_plan
from ..plan import LayerPlan, Plan
from ..runtime import DroppedMoE, attach_novices, condense
from .blocks import drop_blocks
from .merge import merged_tensors
from .structure import experts_per_layer, sync_config_structure


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)


def _slice(tensors: list[ExpertTensor], keep: torch.Tensor, routed: int) -> None:
    """Keep slices `keep` of each tensor; rows past the `routed` experts (shared-expert rows of
    a router, say) are not experts and stay, after the kept ones."""
    for tensor in tensors:
        value = tensor.value
        rows = torch.cat([keep, torch.arange(routed, value.shape[tensor.axis], dtype=keep.dtype)])
        _replace(tensor.module, tensor.name, value.index_select(tensor.axis, rows.to(value.device)).contiguous())


def apply_layer_plan(layer: nn.Module, adapter: MoEAdapter, plan: Plan, lp: LayerPlan, hidden_size: int) -> None:
    """Apply one MoE layer's decision to that decoder layer alone.

    It needs nothing but the layer itself, so the streamed pipeline can apply a plan to one
    materialised layer at a time, and the in-memory path runs the very same code.
    """
    if lp.drop:
        adapter.require_separate_moe()
        setattr(layer, adapter.moe_attr, DroppedMoE(adapter.moe_returns_tuple))
        return
    if len(lp.keep) == lp.num_experts and lp.condensed_weights is None:
        return
    block = adapter.moe_block(layer)
    keep = torch.tensor(sorted(lp.keep), dtype=torch.long)
    router_holders, expert_holders = adapter.count_holders(block)
    routed = adapter.num_experts(block)
    if lp.merges is not None:  # experts, router rows and biases, all computed from this layer's weights
        for tensor, value in list(merged_tensors(adapter, block, lp, plan.merge_permutations.get(lp.layer), routed)):
            _replace(tensor.module, tensor.name, value)
    else:
        _slice(adapter.routed_expert_tensors(block), keep, routed)
    for holder in expert_holders:
        holder.num_experts = len(keep)
    reference = adapter.experts(block).down_proj
    if lp.condensed_weights is not None:
        weights = torch.tensor(lp.condensed_weights, dtype=torch.float32, device=reference.device)
        condense(block, adapter.router_attr, adapter.experts_attr, weights)
    elif lp.novices:
        vectors = plan.novice_vectors.get(lp.layer)
        if vectors is None:
            vectors = torch.zeros(len(lp.removed), hidden_size)
        attach_novices(adapter.experts(block), lp.removed, lp.num_experts, vectors.to(reference.device, reference.dtype).clone())
    else:
        if lp.merges is None:
            _slice(adapter.router_tensors(block), keep, routed)
        for holder in router_holders:
            holder.num_experts = len(keep)


@torch.no_grad()
def apply_plan(model: PreTrainedModel, plan: Plan, adapter: MoEAdapter | None = None) -> PreTrainedModel:
    """Apply `plan` in place, then record the resulting structure in the config.

    Per MoE layer: keep experts (router rows deleted), or replace removed experts by novices
    (router rows stay; zero vectors when the plan carries none: the "no novice" ablation),
    or condense the layer, or drop its MoE sub-layer. Then whole blocks are dropped.
    """
    adapter = adapter or get_adapter(model)
    plan.validate()
    plan.check_model(adapter.model_type, experts_per_layer(model, adapter), len(adapter.decoder_layers(model)), adapter.top_k(model.config))
    routed_left = set(experts_per_layer(model, adapter)) - {lp.layer for lp in plan.layers if lp.drop or lp.condensed_weights is not None}
    if not routed_left - set(plan.dropped_blocks):
        raise MoECompressError("this plan leaves no routed MoE layer; keep at least one MoE layer as it is (or prune it).")
    layers = adapter.decoder_layers(model)
    for lp in plan.layers:
        apply_layer_plan(layers[lp.layer], adapter, plan, lp, text_config(model.config).hidden_size)
    drop_blocks(model, adapter, sorted(plan.dropped_blocks))
    sync_config_structure(model, adapter)
    note_plan(model, plan)
    return model


#: Expert pruning is the most common plan; the name reads better at call sites that only prune.
prune_experts = apply_plan
