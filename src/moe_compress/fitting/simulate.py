"""A candidate's quantisation applied in memory, with the rounding the packed checkpoint loads back to.

Measuring a candidate by writing its compressed-tensors checkpoint and loading it again costs a
save, a pack, a load and a dequantisation per candidate, for weights that are bit for bit what
round-to-nearest gives in memory: the packed integers times the stored scale, in the weights'
dtype (`walk.rounding.round_to_nearest` is the quantizer's own scheme and scales). So `measure`
rounds the copy it holds in place instead, and the test suite checks the logits against the
written-and-reloaded checkpoint (`tests/test_fit_time.py`). The written model still comes from
the real stage (`fitting.write`).

Covered: what `fit` generates -- method "rtn", symmetric, widths per MoE layer or per expert
(`expert_bits`), scope "experts" or "all" (attention, shared experts and dense MLPs at `bits`;
routers, embeddings and head as stored). Anything else runs the stage itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.registry import get_adapter
from ..stages.quantize import Quantize


def simulated(stage: Quantize) -> bool:
    """Whether `simulate` reproduces `stage` (see the module docstring)."""
    return stage.method == "rtn" and stage.symmetric


def layer_roles(model: PreTrainedModel, adapter) -> list[dict[str, str]]:
    """Per decoder layer, its parameters' roles (`slimming.quantize.parameter_roles`), named within the layer:
    what `simulate_layer` rounds, computable on a meta skeleton (a streamed fit rounds one layer read at a time)."""
    from ..slimming.quantize import parameter_roles
    from ..source.residency import layers_prefix

    prefix = f"{layers_prefix(model, adapter)}."
    roles: list[dict[str, str]] = [{} for _ in adapter.decoder_layers(model)]
    for name, role in parameter_roles(model, adapter).items():
        index, _, inner = name.removeprefix(prefix).partition(".")
        roles[int(index)][inner] = role
    return roles


@torch.no_grad()
def simulate_layer(layer: nn.Module, index: int, adapter, stage: Quantize, group: int, roles: dict[str, str]) -> None:
    """Round decoder layer `index` in place as `stage` packs it (`roles`: its entry of `layer_roles`)."""
    from ..walk.rounding import round_experts_in_place, round_to_nearest

    block = adapter.moe_block(layer)
    if block is not None:
        experts = adapter.experts(block)
        value = (stage.expert_bits or {}).get(index, stage.bits)
        widths = [value.get(e, stage.bits) if isinstance(value, Mapping) else value for e in range(adapter.num_experts(block))]
        for bits in sorted(set(widths) - {16}):
            round_experts_in_place(experts, bits, group, None if len(set(widths)) == 1 else {e for e, w in enumerate(widths) if w == bits})
    if stage.scope == "all":
        parameters = dict(layer.named_parameters())
        for name, role in roles.items():
            if role in ("attention", "shared", "dense") and name in parameters and parameters[name].dim() == 2:
                parameters[name].copy_(round_to_nearest(parameters[name], stage.bits, group))


def simulate(model: PreTrainedModel, stage: Quantize, group: int) -> None:
    """Round `model`'s weights in place as `stage` packs them (`group`: the group size it writes with)."""
    adapter = get_adapter(model)
    for index, (layer, roles) in enumerate(zip(adapter.decoder_layers(model), layer_roles(model, adapter))):
        simulate_layer(layer, index, adapter, stage, group, roles)
