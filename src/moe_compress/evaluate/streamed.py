"""A layer-streamed forward to logits: evaluation of a model that never fits in memory at once.

Calibration-style: all sequences go through decoder layer 0, then all through layer 1, ...
(`walk.LayerWalk`), each layer read from the checkpoint once; the head then turns the last
layer's outputs into logits one batch at a time (`walk.capture.logits_from_final_hidden`).
One pass over the weights serves every sequence, so evaluating N batches reads the checkpoint
once, not N times -- but all sequences' hidden states are held between layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from ..arch.registry import get_adapter
from ..source.residency import Weights, split_names
from ..walk.capture import logits_from_final_hidden
from ..walk.observer import run_sequential


@torch.no_grad()
def streamed_logits(
    model: PreTrainedModel,
    weights: Weights,
    batches: list[torch.Tensor],
    consume: Callable[[int, torch.Tensor], None],
    device: str = "cpu",
    description: str = "evaluating layers",
) -> None:
    """Call `consume(batch index, logits [b, s, V])` for every batch, reading each layer once."""
    adapter = get_adapter(model)
    final = run_sequential(model, adapter, batches, device=device, description=description, weights=weights)
    stem, _, head = split_names(model, adapter, model.state_dict(keep_vars=True))
    with weights.loaded_names(stem + head, device):
        for index, (batch, hidden) in enumerate(zip(batches, final)):
            consume(index, logits_from_final_hidden(model, adapter, batch, hidden))
