"""Expert pruning surgery: slice routed experts, router rows and correction biases.

Pure tensor slicing: kept experts keep their weights bit for bit and their relative order,
so the router's top-k among the kept experts picks what it picked before whenever the
original choice survives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import ExpertTensor, MoEAdapter, text_config
from ..arch.registry import get_adapter
from ..errors import MoECompressError
from ..sink.export import note_plan
from ..plan import CondenseLayer, DropMoeLayer, KeepLayer, LayerPlan, MergeLayer, NoviceLayer, Plan
from ..runtime import OUTPUT_FORMAT_KEY, DroppedMoE, attach_novices, condense
from .blocks import drop_blocks
from .merge import merged_tensors
from ..arch.structure import experts_per_layer, sync_config_structure


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
    """Apply one MoE layer's action to that decoder layer alone.

    It needs nothing but the layer itself, so the streamed pipeline can apply a plan to one
    materialised layer at a time, and the in-memory path runs the very same code.
    """
    if not lp.untouched:
        SURGERY[lp.action](layer, adapter, plan, lp, hidden_size)


def _slice_experts(adapter: MoEAdapter, block: nn.Module, lp: KeepLayer | NoviceLayer | CondenseLayer) -> list[nn.Module]:
    """Keep `lp.keep`'s routed experts (ascending ids) and set the expert counts to match; returns
    the modules that count router rows (their count is the action's to set)."""
    keep = torch.tensor(sorted(lp.keep), dtype=torch.long)
    router_holders, expert_holders = adapter.count_holders(block)
    _slice(adapter.routed_expert_tensors(block), keep, adapter.num_experts(block))
    for holder in expert_holders:
        holder.num_experts = len(keep)
    return router_holders


def _keep(layer: nn.Module, adapter: MoEAdapter, plan: Plan, lp: KeepLayer, hidden_size: int) -> None:
    """Kept experts and their router rows (and correction biases) stay; the rest are deleted."""
    block = adapter.moe_block(layer)
    routed = adapter.num_experts(block)  # read off the experts' tensors: before they are sliced
    keep_routing(layer, adapter, lp)
    _slice(adapter.routed_expert_tensors(block), torch.tensor(sorted(lp.keep), dtype=torch.long), routed)


def keep_routing(layer: nn.Module, adapter: MoEAdapter, lp: KeepLayer) -> None:
    """`lp`'s surgery (action "keep") but for the routed experts' own tensors, which stay whole: router rows and
    correction biases sliced, every expert count set. The writer then takes the kept experts' slices straight from
    the tensors as read (`sink.stored_views`), where `_keep` would copy them out first."""
    block = adapter.moe_block(layer)
    routed = adapter.num_experts(block)
    router_holders, expert_holders = adapter.count_holders(block)
    _slice(adapter.router_tensors(block), torch.tensor(sorted(lp.keep), dtype=torch.long), routed)
    for holder in (*expert_holders, *router_holders):
        holder.num_experts = len(lp.keep)


def _novices(layer: nn.Module, adapter: MoEAdapter, plan: Plan, lp: NoviceLayer, hidden_size: int) -> None:
    """Kept experts stay, every router row stays, and removed experts become constant vectors
    (zeros when the plan carries none: the "no novice" ablation)."""
    block = adapter.moe_block(layer)
    _slice_experts(adapter, block, lp)
    reference = adapter.experts(block).down_proj
    vectors = plan.novice_vectors.get(lp.layer)
    if vectors is None:
        vectors = torch.zeros(len(lp.removed), hidden_size)
    attach_novices(adapter.experts(block), lp.removed, lp.num_experts, vectors.to(reference.device, reference.dtype).clone())


def _merge(layer: nn.Module, adapter: MoEAdapter, plan: Plan, lp: MergeLayer, hidden_size: int) -> None:
    """Experts, router rows and biases all computed from this layer's weights (`surgery.merge`)."""
    block = adapter.moe_block(layer)
    router_holders, expert_holders = adapter.count_holders(block)
    for tensor, value in list(merged_tensors(adapter, block, lp, plan.merge_permutations.get(lp.layer), adapter.num_experts(block))):
        _replace(tensor.module, tensor.name, value)
    for holder in (*expert_holders, *router_holders):
        holder.num_experts = len(lp.keep)


def _condense(layer: nn.Module, adapter: MoEAdapter, plan: Plan, lp: CondenseLayer, hidden_size: int) -> None:
    """Kept experts stay, the router goes: every token through them, scaled by the constant weights."""
    block = adapter.moe_block(layer)
    _slice_experts(adapter, block, lp)
    reference = adapter.experts(block).down_proj
    weights = torch.tensor(lp.condensed_weights, dtype=torch.float32, device=reference.device)
    condense(block, adapter.router_attr, adapter.experts_attr, weights)


def _drop_moe(layer: nn.Module, adapter: MoEAdapter, plan: Plan, lp: DropMoeLayer, hidden_size: int) -> None:
    """The MoE sub-layer is replaced by a module that adds nothing to the residual stream."""
    adapter.require_separate_moe()
    setattr(layer, adapter.moe_attr, DroppedMoE(adapter.moe_returns_tuple))


#: action -> its surgery on one decoder layer (an entry that leaves the layer untouched is skipped)
SURGERY: dict[str, Callable[..., None]] = {"keep": _keep, "novices": _novices, "merge": _merge, "condense": _condense, "drop_moe": _drop_moe}


@torch.no_grad()
def apply_plan(model: PreTrainedModel, plan: Plan, adapter: MoEAdapter | None = None) -> PreTrainedModel:
    """Apply `plan` in place, then record the resulting structure in the config.

    Per MoE layer, the surgery of its action (`SURGERY`); then whole blocks are dropped.
    """
    adapter = adapter or get_adapter(model)
    plan.validate()
    plan.check_model(adapter.model_type, experts_per_layer(model, adapter), len(adapter.decoder_layers(model)), adapter.top_k(model.config))
    routed_left = set(experts_per_layer(model, adapter)) - {lp.layer for lp in plan.layers if lp.action in ("condense", "drop_moe")}
    if not routed_left - set(plan.dropped_blocks):
        raise MoECompressError("this plan leaves no routed MoE layer; keep at least one MoE layer as it is (or prune it).")
    layers = adapter.decoder_layers(model)
    for lp in plan.layers:
        apply_layer_plan(layers[lp.layer], adapter, plan, lp, text_config(model.config).hidden_size)
    drop_blocks(model, adapter, sorted(plan.dropped_blocks))
    sync_config_structure(model, adapter, plan.meta.get(OUTPUT_FORMAT_KEY))
    note_plan(model, plan)
    return model


#: Expert pruning is the most common plan; the name reads better at call sites that only prune.
prune_experts = apply_plan
