"""Keep a model's config truthful about its MoE structure after surgery.

Uniform results (every MoE layer keeps the same number of plain experts) only change config
numbers, so they stay stock checkpoints. Anything else is described under the config key
`moe_compress`, which the generated modelling file reads to rebuild the same shapes.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter

STRUCTURE_VERSION = 1


def experts_per_layer(model: PreTrainedModel, adapter: MoEAdapter) -> dict[int, int]:
    layers = adapter.decoder_layers(model)
    return {i: adapter.num_experts(adapter.moe_block(layers[i])) for i in adapter.moe_layer_indices(model)}


def _relative_name(root, target) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise LookupError("module not found under root")


def sync_config_structure(model: PreTrainedModel, adapter: MoEAdapter) -> None:
    """Write the current expert counts into the config (stock keys if uniform, else `moe_compress`)."""
    config = model.config
    counts = experts_per_layer(model, adapter)
    previous = getattr(config, "moe_compress", None) or {}
    original = previous.get("original_num_experts", adapter.config_num_experts(config))
    if len(set(counts.values())) <= 1:
        if counts:
            adapter.set_config_num_experts(config, next(iter(counts.values())))
        if hasattr(config, "moe_compress"):
            del config.moe_compress
        return
    layers = adapter.decoder_layers(model)
    index = next(iter(counts))
    layer = layers[index]
    block = adapter.moe_block(layer)
    adapter.set_config_num_experts(config, original)
    config.moe_compress = {
        "version": STRUCTURE_VERSION,
        "base_model_type": adapter.model_type,
        "original_num_experts": original,
        "layers_path": _relative_name(model, layers),
        "experts_per_layer": {str(i): n for i, n in counts.items()},
        "expert_tensors": [
            [f"{_relative_name(layer, t.module)}.{t.name}".lstrip("."), t.axis] for t in adapter.expert_tensors(block)
        ],
        "count_holders": [_relative_name(layer, m) for m in adapter.expert_count_holders(block)],
    }
