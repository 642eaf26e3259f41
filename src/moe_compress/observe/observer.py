"""The sequential observer: calibration data through the model one decoder layer at a time.

The inputs of layer l are the outputs of layer l-1, kept on CPU; only the current layer is
moved to the compute device. Peak memory is therefore one layer's weights and working set
plus the calibration activations, whatever the depth of the model. Because the loop touches
only `layers[l]` while it works on layer l, the weights of other layers could live on disk
(loaded before, freed after) without changing this code: that is what `on_layer_start` /
`on_layer_end` are for.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from ..arch.adapter import MoEAdapter
from ..progress import track
from .capture import capture_layer_inputs
from .statistics import LayerAccumulator, RoutedBatch


def to_device(value, device: torch.device):
    """Move tensors (also inside tuples and dicts, as in layer kwargs) to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: list[torch.Tensor],
    layer_context: Callable[[int, nn.Module], object] | None = None,
    device: str | torch.device = "cpu",
    description: str = "observing layers",
    after_layer: Callable[[int, nn.Module], bool] | None = None,
) -> list[torch.Tensor]:
    """Run `batches` through every decoder layer in turn; returns the last layer's outputs.

    `layer_context(index, layer)` may return a context manager that is entered while that
    layer processes all batches (statistics hooks attach there). `after_layer(index, layer)`
    runs once the layer has seen every batch; it may change the layer (sparsity methods prune
    it there) and returns True when the next layer should see the changed layer's outputs,
    which are then recomputed.
    """
    device = torch.device(device)
    inputs = capture_layer_inputs(model, adapter, batches)
    hidden = inputs.hidden
    layers = adapter.decoder_layers(model)

    def forward_all(index: int, layer: nn.Module) -> list[torch.Tensor]:
        outputs = []
        for b, kwargs in enumerate(inputs.layer_kwargs[index]):
            out = layer(hidden[b].to(device), **to_device(kwargs, device))
            outputs.append((out[0] if isinstance(out, tuple) else out).to("cpu"))
        return outputs

    for index in track(range(len(layers)), description):
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        with ExitStack() as stack:
            context = layer_context(index, layer) if layer_context else None
            if context is not None:
                stack.enter_context(context)
            outputs = forward_all(index, layer)
        if after_layer is not None and after_layer(index, layer):
            del outputs  # stale: free them before the recomputation, so at most one set is held beside `hidden`
            outputs = forward_all(index, layer)
        hidden = outputs
        layer.to(home)
    return hidden


@contextmanager
def _expert_statistics_hooks(adapter: MoEAdapter, block: nn.Module, accumulator: LayerAccumulator):
    """Hooks that turn each MoE forward of `block` into a `RoutedBatch` for the accumulator."""
    router, experts = adapter.router(block), adapter.experts(block)
    last_logits: list[torch.Tensor] = []
    sequence_length: list[int | None] = [None]

    def on_block(_module, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        sequence_length[0] = hidden.shape[-2] if hidden.dim() == 3 else None

    def on_router(_module, _args, output):
        last_logits[:] = [output[0].reshape(-1, output[0].shape[-1])]

    def on_experts(module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
        if len(values) < 3:  # gpt_oss names them router_indices / routing_weights
            values += [v for k, v in kwargs.items() if k not in names]
        x, top_idx, top_w = values[:3]
        accumulator.update(RoutedBatch(x.reshape(-1, x.shape[-1]), last_logits[0], top_idx, top_w, adapter, module, sequence_length[0]))

    handles = [
        block.register_forward_pre_hook(on_block, with_kwargs=True),
        router.register_forward_hook(on_router),
        experts.register_forward_pre_hook(on_experts, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def observe_expert_statistics(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: list[torch.Tensor],
    names: tuple[str, ...],
    device: str | torch.device = "cpu",
) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer, the requested running sums (see `statistics.STATISTICS`), each of shape [E]."""
    names = tuple(sorted(set(names) | {"tokens"}))
    accumulators: dict[int, LayerAccumulator] = {}

    def layer_context(index: int, layer: nn.Module):
        block = adapter.moe_block(layer)
        if block is None:
            return None
        accumulators[index] = LayerAccumulator(names)
        return _expert_statistics_hooks(adapter, block, accumulators[index])

    run_sequential(model, adapter, batches, layer_context, device, description="calibrating")
    return {index: acc.sums for index, acc in accumulators.items()}
