"""A layer-streamed forward to logits: evaluation of a model that never fits in memory at once.

Calibration-style: all sequences go through decoder layer 0, then all through layer 1, ...
(`walk.LayerWalk`), each layer read from the checkpoint once; the head then turns the last
layer's outputs into logits one batch at a time (`walk.capture.logits_from_final_hidden`).
One pass over the weights serves every sequence, so evaluating N batches reads the checkpoint
once, not N times -- but all sequences' hidden states are held between layers.

The walk and the head are two steps (`BatchLogits.walk`, `BatchLogits.head`) so that a comparison
of two models walks both first and then holds both heads, one batch's logits per side at a time:
each checkpoint is read once, and no model's logits are held for more than the batch at hand. A head
stored alike in both checkpoints is held once (`head(like=...)`, `source.identical`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..arch.registry import get_adapter
from ..source.allocator import trim_heap
from ..source.identical import identical_names
from ..source.residency import Weights, split_names
from ..walk.capture import logits_from_final_hidden
from ..walk.observer import embedding_lookups, run_sequential


@dataclass
class BatchLogits:
    """The logits of `batches`, one batch at a time: in memory from the whole model's forward; streamed
    from the last layer's outputs of one walk over the layers (`final`), through the head."""

    model: PreTrainedModel
    batches: list[torch.Tensor]
    weights: Weights | None = None
    device: str = "cpu"
    final: list[torch.Tensor] | None = None  # streamed: the last decoder layer's outputs per batch

    @classmethod
    @torch.no_grad()
    def walk(cls, model: PreTrainedModel, batches: list[torch.Tensor], weights: Weights | None = None, device: str = "cpu",
             description: str = "evaluating layers") -> BatchLogits:
        """A streamed model's batches through every decoder layer now, each layer read once; an in-memory one's later, per batch."""
        if weights is None or not weights.streamed:
            return cls(model, batches)
        final = run_sequential(model, get_adapter(model), batches, device=device, description=description, weights=weights)
        return cls(model, batches, weights, device, final)

    @contextmanager
    def head(self, like: BatchLogits | None = None) -> Iterator[Callable[[int], torch.Tensor]]:
        """A function batch index -> logits [b, s, V]; streamed, the stem and head are read for the block's duration. The
        input embedding is only looked up in, so only the batches' rows of it are read, unless the head is that same table.
        `like`: another model's streamed batches whose head block is open: head tensors stored alike in both checkpoints
        (`source.identical`: a stage that never touched them) are its resident ones, not a second copy."""
        if self.final is None:
            model_device = next(self.model.parameters()).device
            yield lambda index: self.model(input_ids=self.batches[index].to(model_device), use_cache=False).logits
            return
        adapter = get_adapter(self.model)
        stem, _, head = split_names(self.model, adapter, self.model.state_dict(keep_vars=True))
        tied = getattr(self.model.get_output_embeddings(), "weight", None) is getattr(self.model.get_input_embeddings(), "weight", False)
        lookups = {} if tied else embedding_lookups(self.model, self.batches)
        shared = identical_names(self.weights, like.weights, head) if like is not None and like.final is not None and like.device == self.device else []
        trim_heap()  # what the walks freed back to the system before the head and a batch's logits take their place
        try:
            with self.weights.loaded_names(stem + [name for name in head if name not in shared], self.device, lookups), \
                    (self.weights.borrowed(shared, like.weights) if shared else nullcontext()):
                yield lambda index: logits_from_final_hidden(self.model, adapter, self.batches[index], self.final[index])
        finally:
            self.weights.drop_buffers()  # the head is the walk's last read: nothing follows that could reuse it


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
    with BatchLogits.walk(model, batches, weights, device, description).head() as logits_of:
        for index in range(len(batches)):
            consume(index, logits_of(index))
