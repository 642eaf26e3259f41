"""Block drop: remove whole decoder layers and renumber every per-layer config field.

The result must be a stock checkpoint, so the new config alone has to rebuild the same layer
pattern in plain transformers. Per-layer lists (layer_types, ...) are subset; index lists
(mlp_only_layers) are remapped; counts (first_k_dense_replace) recounted; a sparse step
(decoder_sparse_step > 1) is rewritten as step 1 plus an explicit mlp_only_layers list;
Ernie's MoE range/interval is recomputed. Heterogeneous per-layer values are
re-keyed. The rewritten config is then built on the meta device and compared with the
surgically edited model; a pattern the family's config cannot
express is refused rather than saved wrong.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..arch.adapter import MoEAdapter, resolve, text_config
from ..arch.catalog import auto_model_class
from ..errors import MoECompressError


def _ernie_range(is_moe: list[bool]) -> tuple[int, int, int] | None:
    """(start, end, interval) such that layer i is MoE iff (i+1) % interval == 0 and start <= i <= end."""
    moe = [i for i, flag in enumerate(is_moe) if flag]
    if not moe:
        return None
    for interval in range(1, len(is_moe) + 1):
        rule = [(i + 1) % interval == 0 and moe[0] <= i <= moe[-1] for i in range(len(is_moe))]
        if rule == is_moe:
            return moe[0], moe[-1], interval
    return None


def renumber_config(config: PretrainedConfig, kept: list[int], was_moe: list[bool]) -> None:
    """Rewrite `config` (the text config of a multimodal wrapper) in place for a model that keeps decoder layers `kept`;
    the structure a compressed checkpoint records per layer (`config.moe_compress["layers"]`: experts kept, a dropped
    MoE) is re-keyed too, so that its generated code rebuilds the kept layers as they are."""
    structure = getattr(config, "moe_compress", None)
    if isinstance(structure, dict) and isinstance(structure.get("layers"), dict):
        config.moe_compress = {**structure, "layers": {str(new): structure["layers"][str(old)] for new, old in enumerate(kept) if str(old) in structure["layers"]}}
    config = text_config(config)
    old_count = config.num_hidden_layers
    now_moe = [was_moe[i] for i in kept]
    # Heterogeneous configs (Gemma 4's wider global layers) keep per-layer values keyed by layer index.
    per_layer = config.to_dict().get("per_layer_config") if getattr(config, "is_heterogeneous", False) else None
    if per_layer:
        config.per_layer_config = None
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_count and key != "mlp_only_layers":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    if getattr(config, "first_k_dense_replace", None) is not None:
        config.first_k_dense_replace = sum(1 for i in kept if i < config.first_k_dense_replace)
    if hasattr(config, "mlp_only_layers") or (getattr(config, "decoder_sparse_step", 1) or 1) > 1:
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [new for new, flag in enumerate(now_moe) if not flag]
    if per_layer:
        config.per_layer_config = {str(new): per_layer[str(old)] for new, old in enumerate(kept) if str(old) in per_layer} or None
    if hasattr(config, "moe_layer_interval"):
        found = _ernie_range(now_moe)
        if found is None:
            raise MoECompressError("the remaining layers' MoE pattern cannot be written as an Ernie MoE range; drop other blocks.")
        config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval = found


def _check_layer_kinds(before: list, after: list) -> None:
    """A hybrid stack keeps at least one layer of every kind (transformers cannot run one without its attention layers)."""
    lost = sorted(set(map(str, before)) - set(map(str, after)))
    if lost:
        raise MoECompressError(f"dropping these blocks removes every {', '.join(map(repr, lost))} layer of this hybrid model; drop other blocks.")


PRIMITIVES = (bool, int, float, str, type(None))


def _forward_source(cls: type) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def _settings(layer: nn.Module, adapter: MoEAdapter) -> dict[str, object]:
    """The plain attributes (flags, sizes, indices) a layer's modules read when they run, MoE block excluded.

    Attributes only used while building the module (MiniMax derives its decay buffers, which
    the checkpoint stores, from its depth) do not change what the layer computes.
    """
    block = adapter.moe_block(layer)
    skip = {id(m) for m in block.modules()} if block is not None and block is not layer else set()
    found = {}
    for name, module in layer.named_modules():
        if id(module) in skip:
            continue
        source = _forward_source(type(module))
        for key, value in vars(module).items():
            if key.startswith("_") or key in ("training", "layer_idx") or not isinstance(value, PRIMITIVES):
                continue
            if f"self.{key}" in source:
                found[f"{name}.{key}".lstrip(".")] = value
    return found


def _check_rebuilds(model: PreTrainedModel, adapter: MoEAdapter, config: PretrainedConfig, kept: list[int]) -> None:
    """The renumbered `config` must rebuild the kept layers exactly as they are: same dense/MoE pattern, and
    no setting that depends on a layer's depth (Beam scales residuals by it)."""
    with torch.device("meta"):
        rebuilt = adapter.decoder_layers(auto_model_class(config).from_config(config))
    layers = adapter.decoder_layers(model)
    expected = [adapter.moe_block(layers[i]) is not None for i in kept]
    actual = [adapter.moe_block(layer) is not None for layer in rebuilt]
    if expected != actual:
        raise MoECompressError(
            f"after dropping blocks, the {adapter.model_type} config cannot express the remaining dense/MoE layer pattern "
            f"({expected}); choose other blocks."
        )
    for new, old in enumerate(kept):
        before, after = _settings(layers[old], adapter), _settings(rebuilt[new], adapter)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if changed:
            raise MoECompressError(
                f"dropping these blocks changes a depth-dependent setting of layer {old} ({changed[0]}: "
                f"{before.get(changed[0])} -> {after.get(changed[0])}), which a stock {adapter.model_type} checkpoint "
                "cannot keep; drop later blocks instead."
            )


def check_drop_blocks(model: PreTrainedModel, adapter: MoEAdapter, blocks: list[int]) -> None:
    """Every check `drop_blocks` makes before it changes anything (a meta skeleton will do): raises where the family's
    config cannot express the model without `blocks`."""
    layers = adapter.decoder_layers(model)
    was_moe = [adapter.moe_block(layer) is not None for layer in layers]
    kept = [i for i in range(len(layers)) if i not in set(blocks)]
    kinds = getattr(text_config(model.config), "layer_types", None)
    if isinstance(kinds, list) and len(kinds) == len(layers):
        _check_layer_kinds(kinds, [kinds[i] for i in kept])
    config = copy.deepcopy(model.config)
    renumber_config(config, kept, was_moe)
    _check_rebuilds(model, adapter, config, kept)


def drop_blocks(model: PreTrainedModel, adapter: MoEAdapter, blocks: list[int]) -> None:
    """Remove decoder layers `blocks` (original indices) in place and renumber the config.

    Every check runs before the model changes (`check_drop_blocks`), so a refused drop leaves it as it was.
    """
    if not blocks:
        return
    check_drop_blocks(model, adapter, blocks)
    layers = adapter.decoder_layers(model)
    was_moe = [adapter.moe_block(layer) is not None for layer in layers]
    kept = [i for i in range(len(layers)) if i not in set(blocks)]
    remaining = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(remaining):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent, _, name = adapter.layers_path.rpartition(".")
    setattr(resolve(model, parent) if adapter.layers_path else model.get_decoder(), name or "layers", remaining)
    renumber_config(model.config, kept, was_moe)
