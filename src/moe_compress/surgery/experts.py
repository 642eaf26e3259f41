"""Expert pruning surgery: slice routed experts, router rows and correction biases.

Pure tensor slicing: kept experts keep their weights bit for bit and their relative order,
so the router's top-k among the kept experts picks what it picked before whenever the
original choice survives.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import ExpertTensor, MoEAdapter
from ..arch.registry import get_adapter
from ..plan import Plan
from ..runtime import attach_novices
from .structure import experts_per_layer, sync_config_structure


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, name, value)


def _slice(tensors: list[ExpertTensor], keep: torch.Tensor) -> None:
    for tensor in tensors:
        value = tensor.value
        _replace(tensor.module, tensor.name, value.index_select(tensor.axis, keep.to(value.device)).contiguous())


@torch.no_grad()
def prune_experts(model: PreTrainedModel, plan: Plan, adapter: MoEAdapter | None = None) -> PreTrainedModel:
    """Apply `plan` in place: every MoE layer keeps only `plan.layers[..].keep`.

    Layers planned with novices keep all router rows and replace each removed expert by its
    novice vector (zeros when the plan carries none: the "no novice" ablation).
    """
    adapter = adapter or get_adapter(model)
    plan.validate()
    plan.check_model(adapter.model_type, experts_per_layer(model, adapter))
    layers = adapter.decoder_layers(model)
    for lp in plan.layers:
        if len(lp.keep) == lp.num_experts:
            continue
        block = adapter.moe_block(layers[lp.layer])
        keep = torch.tensor(sorted(lp.keep), dtype=torch.long)
        router_holders, expert_holders = adapter.count_holders(block)
        _slice(adapter.routed_expert_tensors(block), keep)
        for holder in expert_holders:
            holder.num_experts = len(keep)
        if lp.novices:
            experts = adapter.experts(block)
            reference = experts.down_proj
            vectors = plan.novice_vectors.get(lp.layer)
            if vectors is None:
                vectors = torch.zeros(len(lp.removed), model.config.hidden_size)
            attach_novices(experts, lp.removed, lp.num_experts, vectors.to(reference.device, reference.dtype).clone())
        else:
            _slice(adapter.router_tensors(block), keep)
            for holder in router_holders:
                holder.num_experts = len(keep)
    sync_config_structure(model, adapter)
    return model
