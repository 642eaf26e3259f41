"""Capture what each decoder layer receives, without running the decoder layers.

Every decoder layer is temporarily replaced by a recorder that stores its arguments (rotary
embeddings, the family's attention mask for that layer's type, position ids, Gemma 4's
per-layer input) and passes the hidden states straight through. One cheap pass of the model
then yields the embedding output and every layer's keyword arguments for each calibration
batch -- whatever the family computes in its model-level forward (Gemma 4's per-layer inputs
from the stem's per-layer embedding table included), we reuse rather than re-implement.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..arch.adapter import MoEAdapter, warn_if_text_only
from ..errors import MoECompressError


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed."""


def named_arguments(layer: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments after the hidden states, positional ones under the names `layer.forward` gives them.

    Decoder stacks may hand a layer more than the hidden states positionally (Gemma 4 its
    per-layer input, a slice of a tensor the stack computes from the token ids). Replaying
    them by name keeps every walk's call `layer(hidden, **kwargs)` whatever the family.
    """
    if not args:
        return kwargs
    parameters = list(inspect.signature(layer.forward).parameters.values())[1:]
    named = [p.name for p in parameters[: len(args)] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    if len(named) < len(args):
        raise MoECompressError(
            f"{type(layer).__name__} is called with {len(args)} extra positional argument(s) that its forward does not name, "
            "so moe-compress cannot replay them layer by layer: this model type is not supported (`moe-compress families` lists the supported types)."
        )
    return {**dict(zip(named, args)), **kwargs}


class _LayerRecorder(nn.Module):
    def __init__(self, index: int, sink: list, is_last: bool, layer: nn.Module, state: tuple[str, ...] = ()):
        super().__init__()
        self.index, self.sink, self.is_last, self.state = index, sink, is_last, state
        self._layer = [layer]  # not a submodule: the recorder stands in for it

    def __getattr__(self, name: str):
        # Hybrid models read what kind a layer is (NemotronH's `block_type`) before calling it.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"][0], name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.index == 0:
            self.sink.append(("hidden", hidden_states))
        kwargs = named_arguments(self._layer[0], args, kwargs)
        self.sink.append(("kwargs", {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        if self.is_last:
            raise _StopForward
        # Layers that hand state to the next one return it beside the hidden states (see
        # MoEAdapter.layer_state); the recorder passes the incoming state through.
        return (hidden_states, *(kwargs.get(name) for name in self.state)) if self.state else hidden_states


@dataclass
class LayerInputs:
    """Hidden states entering the current layer (one tensor per batch) and every layer's kwargs."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict]]  # [layer][batch]


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: MoEAdapter, batches: list[torch.Tensor]) -> LayerInputs:
    warn_if_text_only(adapter)
    layers = adapter.decoder_layers(model)
    originals = list(layers)
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[list[dict]] = [[] for _ in originals]
    try:
        for batch in batches:
            sink: list = []
            for i in range(len(originals)):
                state = tuple(name for _, name in adapter.layer_state)
                layers[i] = _LayerRecorder(i, sink, is_last=i == len(originals) - 1, layer=originals[i], state=state)
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
