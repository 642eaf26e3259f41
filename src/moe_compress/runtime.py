"""Runtime for compressed structures: the one piece of code shared with saved checkpoints.

This module imports only torch, so it is copied verbatim into every checkpoint that needs it
(as `moe_compress_runtime.py`, imported by the generated modelling file). moe_compress uses
the same functions for in-memory surgery: the model you compress and the model a stranger
reloads with `trust_remote_code=True` run identical code.

A structure spec (stored under `config.moe_compress`) says, per MoE layer, how many rows its
router keeps, how many routed experts keep their weights, and which router rows now point to
*novices* -- a single learned vector added with the router's gate instead of an expert.
"""

from __future__ import annotations

import torch
from torch import nn


def resolve(root: nn.Module, dotted: str) -> nn.Module:
    for part in filter(None, dotted.split(".")):
        root = getattr(root, part)
    return root


def _resize(layer: nn.Module, tensors: list, count: int) -> None:
    """Give each (dotted name, axis) tensor `count` slices along its axis (values loaded later)."""
    for dotted, axis in tensors:
        owner_path, _, name = dotted.rpartition(".")
        owner = resolve(layer, owner_path)
        old = getattr(owner, name)
        if old.shape[axis] == count:
            continue
        shape = list(old.shape)
        shape[axis] = count
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        setattr(owner, name, nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new)


def _set_counts(layer: nn.Module, holders: list, count: int) -> None:
    for dotted in holders:
        resolve(layer, dotted).num_experts = count


_NOVICE_CLASSES: dict[type, type] = {}


def novice_experts_class(base: type) -> type:
    """`base` experts whose router rows may point either to a kept expert or to a novice.

    `expert_slot[e]` is e's index among the kept experts, or -(j + 1) for novice row j. Kept
    experts run through the family's own (possibly fused) experts forward; a token routed to
    a novice gets gate * novice_vectors[j] added instead.
    """
    if base not in _NOVICE_CLASSES:

        def forward(self, hidden_states, top_k_index, top_k_weights):
            slot = self.expert_slot[top_k_index]
            is_novice = slot < 0
            kept_weights = top_k_weights.masked_fill(is_novice, 0)
            out = base.forward(self, hidden_states, slot.clamp(min=0), kept_weights)
            novice_weights = (top_k_weights * is_novice).unsqueeze(-1)
            novices = self.novice_vectors[(-slot - 1).clamp(min=0)]
            return out + (novice_weights * novices).sum(dim=1).to(out.dtype)

        _NOVICE_CLASSES[base] = type(f"Novice{base.__name__}", (base,), {"forward": forward, "_novice_base": base})
    return _NOVICE_CLASSES[base]


def attach_novices(experts: nn.Module, novice_ids: list[int], router_experts: int, novice_vectors: torch.Tensor) -> None:
    """Turn router rows `novice_ids` into novices; the module must already hold only kept experts."""
    novices = set(novice_ids)
    slot, kept, row = [], 0, 0
    for expert in range(router_experts):
        if expert in novices:
            row += 1
            slot.append(-row)
        else:
            slot.append(kept)
            kept += 1
    # Persistent: transformers builds models on the meta device before loading, which would
    # lose the values of a buffer that is not in the checkpoint.
    experts.register_buffer("expert_slot", torch.tensor(slot, dtype=torch.long, device=novice_vectors.device))
    experts.register_buffer("novice_vectors", novice_vectors)
    experts.__class__ = novice_experts_class(getattr(type(experts), "_novice_base", type(experts)))


def apply_structure(model: nn.Module, spec: dict, hidden_size: int) -> None:
    """Reshape a freshly built stock model to the structure `spec` describes."""
    layers = resolve(model, spec["layers_path"])
    for index, layer_spec in spec["layers"].items():
        layer = layers[int(index)]
        _resize(layer, spec["router_tensors"], layer_spec["router"])
        _set_counts(layer, spec["router_count_holders"], layer_spec["router"])
        _resize(layer, spec["expert_tensors"], layer_spec["experts"])
        _set_counts(layer, spec["expert_count_holders"], layer_spec["experts"])
        novices = layer_spec.get("novices") or []
        if novices:
            experts = resolve(layer, spec["experts_path"])
            dtype = experts.down_proj.dtype
            vectors = torch.zeros(len(novices), hidden_size, dtype=dtype, device=experts.down_proj.device)
            attach_novices(experts, novices, layer_spec["router"], vectors)
