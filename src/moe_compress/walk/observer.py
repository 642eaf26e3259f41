"""The sequential observer: calibration data through the model one decoder layer at a time.

The inputs of layer l are the outputs of layer l-1, kept on CPU; only the current layer is
moved to the compute device. Peak memory is therefore one layer's weights and working set
plus the calibration activations, whatever the depth of the model. Because the loop touches
only `layers[l]` while it works on layer l, the weights of other layers could live on disk
(loaded before, freed after) without changing this code: that is what `on_layer_start` /
`on_layer_end` are for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .. import distributed
from ..arch.adapter import MoEAdapter
from ..source.allocator import activation_heap
from ..source.residency import InMemoryWeights, Weights, module_names, split_names
from ..progress import track
from .capture import capture_layer_inputs
from .activations import Activations, default_activations
from .experts_forward import ExpertPass, capturing, is_standard_experts, routing_arguments
from .routed_batch import RoutedBatch
from .statistics import BlockPass, LayerAccumulator


def to_device(value, device: torch.device):
    """Move tensors (also inside tuples and dicts, as in layer kwargs) to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


class LayerWalk:
    """One pass of calibration batches through the decoder layers, one layer at a time.

    Iterating yields `(index, layer)` once the layer has processed every batch (and, if
    `after_layer` changed it, once its outputs were recomputed), while its weights are still
    loaded: a streamed stage writes the layer out right there. After the walk, `hidden`
    holds the last layer's outputs. Between layers the activations live in RAM up to the
    budget of `activations.activation_budget`, beyond it in files (`walk.activations`).

    `layer_context(index, layer)` may return a context manager that is entered while that
    layer processes all batches (statistics hooks attach there). `after_layer(index, layer)`
    runs once the layer has seen every batch; it may change the layer (sparsity methods prune
    it there) and returns True when the next layer should see the changed layer's outputs.
    `weights` says where the model's tensors live (default: in memory); a streamed model
    reads each layer from its checkpoint for the duration of its turn.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: MoEAdapter,
        batches: list[torch.Tensor],
        layer_context: Callable[[int, nn.Module], object] | None = None,
        device: str | torch.device = "cpu",
        description: str = "observing layers",
        after_layer: Callable[[int, nn.Module], bool] | None = None,
        weights: Weights | None = None,
    ):
        self.model, self.adapter, self.batches = model, adapter, batches
        self.layer_context, self.after_layer = layer_context, after_layer
        self.device, self.description = torch.device(device), description
        self.weights = weights or InMemoryWeights(model)
        self.hidden: list[torch.Tensor] = []

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[int, nn.Module]]:
        store = default_activations()
        try:
            yield from self._walk(store)
        finally:
            store.close()
            self.weights.drop_buffers()

    def _walk(self, store: Activations) -> Iterator[tuple[int, nn.Module]]:
        stem, _, _ = split_names(self.model, self.adapter, self.model.state_dict(keep_vars=True))
        with self.weights.loaded_names(stem, self.device, embedding_lookups(self.model, self.batches)), activation_heap():
            inputs = capture_layer_inputs(self.model, self.adapter, self.batches)
        current = [store.keep(h) for h in inputs.hidden]
        inputs.hidden.clear()
        layers = self.adapter.decoder_layers(self.model)
        # State a layer hands to the next one beside the hidden states (adapter.layer_state, e.g.
        # GLM-5's sparse-attention indices), per batch: what enters the current layer, what leaves it.
        carried: list[dict] = [{} for _ in current]
        handed: list[dict] = [{} for _ in current]

        def forward_all(index: int, layer: nn.Module) -> list:
            outputs = []
            for b, kwargs in enumerate(inputs.layer_kwargs[index]):
                out = layer(store.get(current[b]).to(self.device), **to_device({**kwargs, **carried[b]}, self.device))
                outputs.append(store.keep(out[0] if isinstance(out, tuple) else out))
                handed[b] = {name: out[i] for i, name in self.adapter.layer_state}
            return outputs

        for index in track(range(len(layers)), self.description):
            with self.weights.loaded(layers[index], self.device) as layer:
                with ExitStack() as stack:
                    context = self.layer_context(index, layer) if self.layer_context else None
                    if context is not None:
                        stack.enter_context(context)
                    with activation_heap():
                        outputs = forward_all(index, layer)
                if self.after_layer is not None and self.after_layer(index, layer):
                    store.release(outputs)  # stale: free them before the recomputation
                    with activation_heap():
                        outputs = forward_all(index, layer)
                store.release(current)
                current = outputs
                carried = [dict(state) for state in handed]
                self.hidden = [store.get(h) for h in current] if index == len(layers) - 1 else []
                yield index, layer


def embedding_lookups(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{input embedding weight: the rows `batches` look up}, for the stem of a walk, which only looks rows up
    in it (`StreamedWeights.materialize`); {} where the input embedding is not a lookup table."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding) or not batches:
        return {}
    name = module_names(model)[id(embedding)]
    return {f"{name}.weight": torch.unique(torch.cat([batch.reshape(-1) for batch in batches]).cpu())}


def run_sequential(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: list[torch.Tensor],
    layer_context: Callable[[int, nn.Module], object] | None = None,
    device: str | torch.device = "cpu",
    description: str = "observing layers",
    after_layer: Callable[[int, nn.Module], bool] | None = None,
    weights: Weights | None = None,
) -> list[torch.Tensor]:
    """Walk every decoder layer (see `LayerWalk`); returns the last layer's outputs."""
    walk = LayerWalk(model, adapter, batches, layer_context, device, description, after_layer, weights)
    for _ in walk:
        pass
    return walk.hidden


@contextmanager
def _block_hook(layer: nn.Module, accumulator: LayerAccumulator):
    """Hand each forward of the decoder `layer` to the accumulator's whole-layer statistics, as a `BlockPass`."""

    def on_layer(_module, args, kwargs, output):
        before = args[0] if args else kwargs["hidden_states"]
        accumulator.update_block(BlockPass(before, output[0] if isinstance(output, tuple) else output))

    handle = layer.register_forward_hook(on_layer, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _expert_statistics_hooks(adapter: MoEAdapter, layer: nn.Module, block: nn.Module, accumulator: LayerAccumulator):
    """Turn each MoE forward of `block` (in decoder `layer`) into a `RoutedBatch` for the accumulator, and each forward
    of `layer` into a `BlockPass` where a statistic reads the whole layer.

    A standard experts module hands over the expert outputs its forward computes anyway
    (`experts_forward.capturing`); any other is observed from a pre-hook, and the
    statistics that need outputs compute them.
    """
    router, experts = adapter.router(block), adapter.experts(block)
    last_logits: list[torch.Tensor] = []
    sequence_length: list[int | None] = [None]  # tokens per calibration sequence, for per-sequence statistics

    def on_block(_module, args, kwargs):
        hidden = args[0] if args else next(iter(kwargs.values()))
        sequence_length[0] = hidden.shape[-2] if hidden.dim() == 3 else None

    def on_router(_module, _args, output):
        last_logits[:] = [output[0].reshape(-1, output[0].shape[-1])]

    def record(captured: ExpertPass) -> None:
        batch = RoutedBatch(captured.x, last_logits[0], captured.top_idx, captured.top_w, adapter, experts, captured.outputs, sequence_length[0])
        accumulator.update(batch)

    def on_experts(_module, args, kwargs):
        x, top_idx, top_w = routing_arguments(args, kwargs)
        accumulator.update(RoutedBatch(x.reshape(-1, x.shape[-1]), last_logits[0], top_idx, top_w, adapter, experts, None, sequence_length[0]))

    with ExitStack() as stack:
        if accumulator.sees_block:
            stack.enter_context(_block_hook(layer, accumulator))
        for handle in (block.register_forward_pre_hook(on_block, with_kwargs=True), router.register_forward_hook(on_router)):
            stack.callback(handle.remove)
        if accumulator.needs_expert_outputs and is_standard_experts(experts):
            stack.enter_context(capturing(experts, record))
        else:
            handle = experts.register_forward_pre_hook(on_experts, with_kwargs=True)
            stack.callback(handle.remove)
        yield


class ExpertObserver:
    """The `layer_context` of a statistics walk: one accumulator of `names` per MoE layer it visits.

    `observe_expert_statistics` walks every layer with it and reads the sums at the end; a streamed
    prune that writes each layer during the walk (`engine.fused`) reads each layer's sums as soon as
    the walk yields that layer, which in one process are already final (no other rank to fold in).
    """

    def __init__(self, adapter: MoEAdapter, names: tuple[str, ...]):
        self.adapter = adapter
        self.names = tuple(sorted(set(names) | {"tokens"}))
        self.accumulators: dict[int, LayerAccumulator] = {}

    def __call__(self, index: int, layer: nn.Module):
        block = self.adapter.moe_block(layer)
        if block is None:
            return None
        self.accumulators[index] = LayerAccumulator(self.names)
        return _expert_statistics_hooks(self.adapter, layer, block, self.accumulators[index])


def observe_expert_statistics(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: list[torch.Tensor],
    names: tuple[str, ...],
    device: str | torch.device = "cpu",
    weights: Weights | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer, the requested running sums (see `statistics.STATISTICS`), each of shape [E].

    Under torchrun each rank observes its share of `batches` and all ranks end with the
    combined statistics (see `distributed`).
    """
    distributed.check_shareable(len(batches))
    observer = ExpertObserver(adapter, names)
    run_sequential(model, adapter, distributed.shard(batches), observer, device, description="calibrating", weights=weights)
    for accumulator in observer.accumulators.values():
        accumulator.combine_ranks()
    return {index: acc.sums for index, acc in observer.accumulators.items()}
