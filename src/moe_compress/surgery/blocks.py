"""Block drop: remove whole decoder layers and renumber every per-layer config field.

The result must be a stock checkpoint, so the new config alone has to rebuild the same layer
pattern in plain transformers. Per-layer lists (layer_types, ...) are subset; index lists
(mlp_only_layers) are remapped; counts (first_k_dense_replace) recounted; a sparse step
(decoder_sparse_step > 1) is rewritten as step 1 plus an explicit mlp_only_layers list;
Ernie's MoE range/interval is recomputed. The rewritten config is then built on the meta
device and compared with the surgically edited model; a pattern the family's config cannot
express is refused rather than saved wrong.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..arch.adapter import MoEAdapter
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
    """Rewrite `config` in place for a model that keeps decoder layers `kept` (old indices)."""
    old_count = config.num_hidden_layers
    now_moe = [was_moe[i] for i in kept]
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old_count and key != "mlp_only_layers":
            setattr(config, key, [value[i] for i in kept])
    config.num_hidden_layers = len(kept)
    if getattr(config, "first_k_dense_replace", None) is not None:
        config.first_k_dense_replace = sum(1 for i in kept if i < config.first_k_dense_replace)
    if hasattr(config, "mlp_only_layers") or (getattr(config, "decoder_sparse_step", 1) or 1) > 1:
        config.decoder_sparse_step = 1
        config.mlp_only_layers = [new for new, flag in enumerate(now_moe) if not flag]
    if hasattr(config, "moe_layer_interval"):
        found = _ernie_range(now_moe)
        if found is None:
            raise MoECompressError("the remaining layers' MoE pattern cannot be written as an Ernie MoE range; drop other blocks.")
        config.moe_layer_start_index, config.moe_layer_end_index, config.moe_layer_interval = found


def _check_rebuilds(model: PreTrainedModel, adapter: MoEAdapter) -> None:
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(model.config)
    expected = [adapter.moe_block(layer) is not None for layer in adapter.decoder_layers(model)]
    actual = [adapter.moe_block(layer) is not None for layer in adapter.decoder_layers(rebuilt)]
    if expected != actual:
        raise MoECompressError(
            f"after dropping blocks, the {adapter.model_type} config cannot express the remaining dense/MoE layer pattern "
            f"({expected}); choose other blocks."
        )


def drop_blocks(model: PreTrainedModel, adapter: MoEAdapter, blocks: list[int]) -> None:
    """Remove decoder layers `blocks` (original indices) in place and renumber the config."""
    if not blocks:
        return
    layers = adapter.decoder_layers(model)
    was_moe = [adapter.moe_block(layer) is not None for layer in layers]
    kept = [i for i in range(len(layers)) if i not in set(blocks)]
    remaining = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(remaining):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    model.get_decoder().layers = remaining
    renumber_config(model.config, kept, was_moe)
    _check_rebuilds(model, adapter)
