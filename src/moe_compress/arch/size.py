"""What a model is made of: parameter counts by role, bytes, and parameters active per token."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from .adapter import MoEAdapter
from .parts import ModelSize, layer_row, report
from ..runtime import ConstantRouter


def _unique_params(module: nn.Module, seen: set[int]) -> list[nn.Parameter]:
    """Parameters of `module` not counted yet (tied weights count once)."""
    fresh = []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            fresh.append(p)
    return fresh


def model_size(model: PreTrainedModel, adapter: MoEAdapter) -> ModelSize:
    size = ModelSize(top_k=adapter.top_k(model.config))
    seen: set[int] = set()
    layers = adapter.decoder_layers(model)
    size.num_layers = len(layers)

    def count(module: nn.Module | None) -> int:
        return sum(p.numel() for p in _unique_params(module, seen)) if module is not None else 0

    for index, layer in enumerate(layers):
        size.attention += count(getattr(layer, "self_attn", None))
        block = adapter.moe_block(layer)
        if block is None:
            continue
        routed = count(adapter.experts(block))
        experts = adapter.num_experts(block)
        size.routed_experts += routed
        size.experts_per_layer[index] = experts
        # A token uses top_k of the layer's experts; a condensed layer (constant router) uses all it kept.
        used = experts if isinstance(adapter.router(block), ConstantRouter) else min(size.top_k, experts)
        size.active_per_token += round(routed * used / experts) if experts else 0
        size.shared_experts += sum(count(m) for m in adapter.shared_experts(block))
        size.router += count(adapter.router(block))
    size.other = count(model)
    size.active_per_token += size.attention + size.shared_experts + size.router + size.other
    size.bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    return size


def checkpoint_bytes(directory: str | Path) -> int:
    """Bytes of the weight files of a saved checkpoint."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def structure_report(name: str, model: PreTrainedModel, adapter: MoEAdapter) -> dict:
    """What `inspect` prints: per decoder layer its kind, routed experts and shared-expert modules, and the model's size."""
    size = model_size(model, adapter)
    rows = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        shared = len(adapter.shared_experts(block)) if block is not None else 0
        rows.append(layer_row(index, block is not None, size.experts_per_layer.get(index, 0), shared))
    return report(name, adapter.model_type, str(model.dtype), rows, size)
