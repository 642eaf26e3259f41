"""Keep a model's config truthful about its MoE structure after surgery.

Uniform results (every MoE layer keeps the same number of plain experts) only change config
numbers, so they stay stock checkpoints. Anything else (per-layer counts, novices) is
described under the config key `moe_compress`, in the spec format `runtime.apply_structure`
reads to rebuild the same shapes in a process without moe_compress.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .adapter import MoEAdapter
from ..errors import MoECompressError
from ..runtime import OUTPUT_FORMAT_KEY, ConstantRouter, DroppedMoE

STRUCTURE_VERSION = 3  # 3: names the expert-count key, for the standard per_layer_config


def experts_per_layer(model: PreTrainedModel, adapter: MoEAdapter) -> dict[int, int]:
    """Routed experts that hold weights, per MoE layer."""
    layers = adapter.decoder_layers(model)
    return {i: adapter.num_experts(adapter.moe_block(layers[i])) for i in adapter.moe_layer_indices(model)}


def require_droppable(model: PreTrainedModel, adapter: MoEAdapter, unit: str, chosen: list[int]) -> None:
    """That dropping the decoder layers `chosen` leaves a MoE layer routing: with unit "moe" their MoE sub-layers (a module
    of its own in the family) among the MoE layers, with unit "block" whole blocks among the decoder layers. The drop's plan
    (`methods.structural`) and the stage's preflight (`preflight.check_drop`) refuse alike."""
    moe = adapter.moe_layer_indices(model)
    if unit == "block":
        blocks = len(adapter.decoder_layers(model))
        if not set(chosen) <= set(range(blocks)) or not set(moe) - set(chosen):
            raise MoECompressError(f"can drop blocks among 0..{blocks - 1} but not every MoE layer {moe} (one must keep routing); asked for blocks {chosen}.")
        return
    adapter.require_separate_moe()
    if not set(chosen) < set(moe):
        raise MoECompressError(f"can drop MoE sub-layers of layers {moe} but one (one must keep routing); asked for layers {chosen}.")


def novice_ids(experts) -> list[int]:
    """Router rows of an experts module that point to novices (empty for plain experts)."""
    slot = getattr(experts, "expert_slot", None)
    return [] if slot is None else (slot < 0).nonzero().flatten().tolist()


def _relative_name(root, target) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise LookupError("module not found under root")


def layer_structure(model: PreTrainedModel, adapter: MoEAdapter) -> dict[int, dict]:
    layers = adapter.decoder_layers(model)
    structure = {}
    for index, layer in enumerate(layers):
        if isinstance(getattr(layer, adapter.moe_attr, None), DroppedMoE):
            structure[index] = {"dropped": True}
            continue
        block = adapter.moe_block(layer)
        if block is None:
            continue
        entry = {"router": adapter.router_size(block), "experts": adapter.num_experts(block)}
        if novices := novice_ids(adapter.experts(block)):
            entry["novices"] = novices
        if isinstance(adapter.router(block), ConstantRouter):
            entry["condensed"] = True
        structure[index] = entry
    return structure


def _reference_block(model: PreTrainedModel, adapter: MoEAdapter) -> int:
    """An MoE layer whose router is a real router, to read tensor names from.

    The config is written from the live model, so at least one MoE layer must still route;
    a plan that drops or condenses every MoE layer is refused before surgery.
    """
    for index in adapter.moe_layer_indices(model):
        if not isinstance(adapter.router(adapter.moe_block(adapter.decoder_layers(model)[index])), ConstantRouter):
            return index
    raise ValueError("no routed MoE layer left to describe")


def structure_spec(model: PreTrainedModel, adapter: MoEAdapter, original: int) -> dict:
    """The spec `runtime.apply_structure` rebuilds the model's MoE structure from (`original`: the config's expert count)."""
    structure = layer_structure(model, adapter)
    layers = adapter.decoder_layers(model)
    layer = layers[_reference_block(model, adapter)]
    block = adapter.moe_block(layer)
    router_holders, expert_holders = adapter.count_holders(block)
    dotted = lambda tensors: [[f"{_relative_name(layer, t.module)}.{t.name}".lstrip("."), t.axis] for t in tensors]  # noqa: E731
    return {
        "version": STRUCTURE_VERSION,
        "base_model_type": adapter.model_type,
        "original_num_experts": original,
        "num_experts_key": adapter.num_experts_key,
        "layers_path": _relative_name(model, layers),
        "moe_attr": adapter.moe_attr,
        "router_attr": adapter.router_attr,
        "experts_attr": adapter.experts_attr,
        "moe_returns_tuple": adapter.moe_returns_tuple,
        "experts_path": _relative_name(layer, adapter.experts(block)),
        "layers": {str(i): s for i, s in structure.items()},
        "router_tensors": dotted(adapter.router_tensors(block)),
        "expert_tensors": dotted(adapter.routed_expert_tensors(block)),
        "router_count_holders": [_relative_name(layer, m) for m in router_holders],
        "expert_count_holders": [_relative_name(layer, m) for m in expert_holders],
    }


def sync_config_structure(model: PreTrainedModel, adapter: MoEAdapter, output_format: str | None = None) -> None:
    """Write the current structure into the config (stock keys if uniform, else `moe_compress`).

    `output_format` (a MoNE plan's, e.g. "expert-substitution") is how the checkpoint lays out its weights
    (`sink.substitution`); None keeps the one the config already states, "pruned" the default layout.
    """
    config = model.config
    structure = layer_structure(model, adapter)
    previous = getattr(config, "moe_compress", None) or {}
    original = previous.get("original_num_experts", adapter.config_num_experts(config))
    shapes = {(s.get("router"), s.get("experts")) for s in structure.values()}
    if len(shapes) <= 1 and not any(set(s) - {"router", "experts"} for s in structure.values()):
        if shapes:
            adapter.set_config_num_experts(config, next(iter(shapes))[1])
        if hasattr(config, "moe_compress"):
            del config.moe_compress
        return
    adapter.set_config_num_experts(config, original)
    config.moe_compress = structure_spec(model, adapter, original)
    chosen = previous.get(OUTPUT_FORMAT_KEY) if output_format is None else output_format
    if chosen not in (None, "pruned"):
        config.moe_compress[OUTPUT_FORMAT_KEY] = chosen
