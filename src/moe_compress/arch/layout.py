"""Where a model keeps its decoder layers and experts: read from the module tree alone.

The adapter (to re-find the layers of a model wrapped differently than the one discovered) and
discovery (to build the adapter) both need this; it lives apart so neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MoECompressError

#: Words in the path of a multimodal wrapper's encoder towers (never the language model).
TOWERS = ("vision", "visual", "audio", "image")


def is_experts_module(module: nn.Module) -> bool:
    """The transformers standard experts module: decorated flags and a fused 3-D `down_proj`."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, torch.Tensor) and down.dim() == 3 and hasattr(module, "has_gate") and hasattr(module, "is_transposed")


def experts_in(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in layer.named_modules() if is_experts_module(m)]


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, list) of the model's decoder layers: the layer list holding the experts."""
    stacks = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and any(experts_in(child) for child in module)
    ]
    if not stacks:
        raise MoECompressError(
            f"{type(model).__name__} has no layer with the standard transformers experts module "
            "(fused gate_up_proj/down_proj): it is not an MoE model this version can compress."
        )
    towers = [(name, module) for name, module in stacks if any(kind in name for kind in TOWERS)]
    if len(stacks) - len(towers) == 1:  # a multimodal wrapper whose vision tower is an MoE too (Dots3)
        stacks = [stack for stack in stacks if stack not in towers]
    if len(stacks) > 1:
        raise MoECompressError(
            f"{type(model).__name__} has {len(stacks)} stacks of MoE layers ({', '.join(n for n, _ in stacks)}); "
            "only models with one decoder stack are supported."
        )
    return stacks[0]
