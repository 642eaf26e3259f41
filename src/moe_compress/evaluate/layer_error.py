"""Which decoder layer changed: each layer of one model against the same layer of another, on the same inputs.

End-to-end numbers (KL, top-1) say that a compressed model drifted, not where. Comparing the two
models' hidden states layer by layer does not say it either: an error made in layer 2 is carried
by every later layer, so the last layers always look worst. Here each layer is fed the same
input -- what the *reference* model's previous layer produced -- and only its own output is
compared (teacher forcing per layer), so a layer's error is its own:

    error_l = ||after_l(h) - before_l(h)|| / ||before_l(h) - h||,   h = the reference input of layer l,

summed over every token of the windows. The denominator is the layer's own contribution to the
residual stream (a decoder layer returns h plus its attention and MLP updates), not the size of its
output: the residual h is the same in both models and would dilute every error toward zero. An
error of 0.01 is a 1 % change of what the layer adds; 1.0 means it adds something as far from the
reference as the reference is from nothing.

The walk is the observer's (`walk.LayerWalk`) over the reference model, so either model may be
streamed from its checkpoint: the reference's layer l and the other model's layer l are the only
decoder weights loaded at a time. Only models with the same decoder layers are compared (a stage
may change what is inside a layer -- fewer experts, quantised weights --, not how many there are:
after a block drop, which layer of one is which of the other is the plan's to say, not the models').
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.registry import get_adapter
from ..source.residency import InMemoryWeights, Weights
from ..walk.observer import run_sequential


class _Sums:
    """Per layer: squared norm of the output difference and of the reference layer's update, in float64."""

    def __init__(self) -> None:
        self.error: dict[int, float] = {}
        self.update: dict[int, float] = {}

    def add(self, index: int, hidden: torch.Tensor, reference: torch.Tensor, other: torch.Tensor) -> None:
        hidden, reference, other = (t.double() for t in (hidden, reference, other))
        self.error[index] = self.error.get(index, 0.0) + float((other - reference).pow(2).sum())
        self.update[index] = self.update.get(index, 0.0) + float((reference - hidden).pow(2).sum())

    def relative(self) -> dict[int, float]:
        return {i: (self.error[i] / self.update[i]) ** 0.5 if self.update[i] > 0 else (0.0 if self.error[i] == 0 else float("inf"))
                for i in sorted(self.error)}


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def layer_errors(
    before: PreTrainedModel,
    after: PreTrainedModel,
    batches: list[torch.Tensor],
    before_weights: Weights | None = None,
    after_weights: Weights | None = None,
    device: str = "cpu",
) -> dict[int, float] | None:
    """Decoder layer index -> relative error of `after`'s layer against `before`'s on `before`'s inputs (see the module docstring);
    None when the models' decoder layers do not correspond one to one (a block drop removed some)."""
    before_layers = get_adapter(before).decoder_layers(before)
    after_layers = get_adapter(after).decoder_layers(after)
    if len(before_layers) != len(after_layers):
        return None
    after_weights = after_weights or InMemoryWeights(after)
    sums = _Sums()

    @contextmanager
    def compared(index: int, layer: nn.Module) -> Iterator[None]:
        with after_weights.loaded(after_layers[index], device) as other:

            def hook(_module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
                hidden = args[0]
                sums.add(index, hidden, _first(output), _first(other(hidden, **kwargs)))

            handle = layer.register_forward_hook(hook, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

    run_sequential(before, get_adapter(before), batches, compared, device, "comparing layers", weights=before_weights)
    return sums.relative()
