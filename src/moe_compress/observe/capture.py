"""Capture what each decoder layer receives, without running the decoder layers.

Every decoder layer is temporarily replaced by a recorder that stores its arguments (rotary
embeddings, the family's attention mask for that layer's type, position ids) and passes the
hidden states straight through. One cheap pass of the model then yields the embedding
output and every layer's keyword arguments for each calibration batch -- whatever the
family computes in its model-level forward, we reuse rather than re-implement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..arch.adapter import MoEAdapter


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


class _LayerRecorder(nn.Module):
    def __init__(self, index: int, sink: list, is_last: bool):
        super().__init__()
        self.index, self.sink, self.is_last = index, sink, is_last

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layers called with extra positional arguments are not supported")
        if self.index == 0:
            self.sink.append(("hidden", hidden_states))
        self.sink.append(("kwargs", {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        if self.is_last:
            raise _StopForward
        return hidden_states


@dataclass
class LayerInputs:
    """Hidden states entering the current layer (one tensor per batch) and every layer's kwargs."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict]]  # [layer][batch]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: MoEAdapter, batches: list[torch.Tensor]) -> LayerInputs:
    layers = adapter.decoder_layers(model)
    originals = list(layers)
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[list[dict]] = [[] for _ in originals]
    try:
        for batch in batches:
            sink: list = []
            for i in range(len(originals)):
                layers[i] = _LayerRecorder(i, sink, is_last=i == len(originals) - 1)
            try:
                model(input_ids=batch.to(model.get_input_embeddings().weight.device), use_cache=False)
            except _StopForward:
                pass
            hidden.append(sink[0][1].detach().to("cpu"))
            for i, (_, kwargs) in enumerate(sink[1:]):
                layer_kwargs[i].append(kwargs)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(hidden, layer_kwargs)


class _Replay(nn.Module):
    """Stands in for a decoder layer: the last one returns the precomputed output of the whole stack."""

    def __init__(self, output: torch.Tensor | None):
        super().__init__()
        self.output = output

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states if self.output is None else self.output.to(hidden_states.device, hidden_states.dtype)


@torch.no_grad()
def logits_from_final_hidden(model: nn.Module, adapter: MoEAdapter, input_ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits for `input_ids`, given what its last decoder layer outputs for them.

    The model's own forward runs with every decoder layer replaced by a stand-in (the last
    returns `final_hidden`), so whatever the family does after its layers -- final norm,
    logit scaling, soft-capping -- is applied by transformers itself, not re-implemented here.
    Needs the embeddings and the head loaded; the decoder layers are not touched.
    """
    layers = adapter.decoder_layers(model)
    originals = list(layers)
    try:
        for i in range(len(originals)):
            layers[i] = _Replay(final_hidden if i == len(originals) - 1 else None)
        device = model.get_input_embeddings().weight.device
        return model(input_ids=input_ids.to(device), use_cache=False).logits
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
