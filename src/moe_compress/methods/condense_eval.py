"""What the CD-MoE search evaluates: divergences of a temporarily condensed model, cheaply.

Two pieces serve every candidate:
  * `CachedLayers` holds the input of every decoder layer for the calibration batches, computed
    once from the original model, and runs layers l..L from any of them. The search needs
    nothing else from the model -- a layer's cached inputs, layers l..L and the final norm --
    so a streamed pipeline can serve these from disk.
  * `LayerProbe` runs one decoder layer once and records its attention output and its MoE
    input. A candidate condensed MoE output then becomes the layer's output by replaying the
    layer's own code with attention and MoE replaced by the recorded/candidate tensors: no
    attention is recomputed, residual multipliers and norms stay the family's own, and many
    candidates go through in one stacked call (elementwise and per-token operations, so
    stacking does not change any value).

Divergences are the Jensen-Shannon divergence (nats) averaged over tokens; calibration windows
all have the same length, so this equals the CD-MoE authors' mean over samples of per-sample
token means.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..walk.capture import capture_layer_inputs
from ..runtime import condense, expert_forward

#: Candidates stacked in one call are bounded by this many bytes of float64 distributions.
STACK_BYTES = 64 * 2**20
#: A layer's weighted expert outputs are kept across greedy steps when all of them fit in this.
EXPERT_CACHE_BYTES = 512 * 2**20


def first(output):
    return output[0] if isinstance(output, tuple) else output


class JSDTarget:
    """A fixed reference distribution p [..., D], with its share of the JSD computed once.

    JSD(p || q) = 1/2 sum(p log p + q log q) - sum(m log m), m = (p + q) / 2, in nats, float64:
    no logsumexp and no stacked copies (the search scores thousands of candidates), and float64
    because for nearly equal p and q the terms cancel to ~1e-5 of their size. `per_token(log_q)`
    accepts candidates stacked in front ([C, ..., D]) and broadcasts p over them.
    """

    def __init__(self, log_p: torch.Tensor):
        log_p = log_p.double()
        self.p = log_p.exp()
        self.p_log_p = (self.p * log_p).sum(-1)

    def per_token(self, log_q: torch.Tensor) -> torch.Tensor:
        log_q = log_q.double()
        q = log_q.exp()
        m = 0.5 * (self.p + q)
        return (0.5 * (self.p_log_p + (q * log_q).sum(-1)) - torch.xlogy(m, m).sum(-1)).clamp_min(0.0)


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of JSD(p || q), from log-probabilities [..., D]."""
    return JSDTarget(log_p.reshape(-1, log_p.shape[-1])).per_token(log_q.reshape(-1, log_q.shape[-1])).mean()


def hidden_log_probs(hidden: torch.Tensor) -> torch.Tensor:
    """The CD-MoE authors' distribution over a hidden state: softmax over the hidden dimension."""
    return F.log_softmax(hidden.float(), dim=-1)


def final_normed(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_decoder().norm(hidden)


def next_token_log_probs(model: PreTrainedModel, hidden: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Next-token log-probabilities from the last decoder layer's output, at every `stride`-th position."""
    logits = model.get_output_embeddings()(final_normed(model, hidden[..., ::stride, :])).float()
    return F.log_softmax(logits / getattr(model.config, "logits_scaling", 1.0), dim=-1)


def mean_selected_gate(layer_stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """w_e: the mean gate weight of e over the tokens that selected it (0 if none did)."""
    return layer_stats["gate_sum"] / layer_stats["selected"].clamp_min(1)


@contextmanager
def condensed(adapter: MoEAdapter, block: nn.Module, experts: list[int], weights: torch.Tensor):
    """Temporarily condense `block` onto `experts` (ids of its unsliced experts module; may be empty)."""
    router, module = adapter.router(block), adapter.experts(block)
    original_class = type(module)
    device = module.down_proj.device
    ids = torch.tensor(experts, dtype=torch.long, device=device)
    condense(block, adapter.router_attr, adapter.experts_attr, weights[ids.cpu()].float().to(device), ids)
    try:
        yield
    finally:
        setattr(block, adapter.router_attr, router)
        module.__class__ = original_class


@contextmanager
def all_condensed(adapter: MoEAdapter, decoder: nn.ModuleList, sets: dict[int, list[int]], weights: dict[int, torch.Tensor]):
    with ExitStack() as stack:
        for layer, experts in sets.items():
            stack.enter_context(condensed(adapter, adapter.moe_block(decoder[layer]), experts, weights[layer]))
        yield


def repeat_batch(value, batch: int, times: int):
    """Repeat tensors whose leading dimension is the batch (> 1) `times` along it; others broadcast."""
    if isinstance(value, torch.Tensor):
        return value.repeat(times, *([1] * (value.dim() - 1))) if batch > 1 and value.dim() and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(repeat_batch(v, batch, times) for v in value)
    if isinstance(value, dict):
        return {k: repeat_batch(v, batch, times) for k, v in value.items()}
    return value


class CachedLayers:
    """Inputs of every decoder layer for each calibration batch, from the original model."""

    @torch.no_grad()
    def __init__(self, model: PreTrainedModel, adapter: MoEAdapter, batches: list[torch.Tensor]):
        self.model, self.adapter = model, adapter
        self.decoder = adapter.decoder_layers(model)
        captured = capture_layer_inputs(model, adapter, batches)
        self.kwargs = captured.layer_kwargs
        self._inputs: list[list[torch.Tensor]] = []
        hidden = captured.hidden
        for index in range(len(self.decoder)):
            self._inputs.append(hidden)
            hidden = self.run(index, hidden, index + 1)
        self.final = hidden

    def inputs(self, index: int) -> list[torch.Tensor]:
        """What decoder layer `index` received, per batch (the last layer's output for index = L)."""
        return self._inputs[index] if index < len(self._inputs) else self.final

    @torch.no_grad()
    def run(self, start: int, hidden: list[torch.Tensor], stop: int | None = None) -> list[torch.Tensor]:
        """Run decoder layers start..stop-1 on `hidden`, one tensor per calibration batch."""
        return [self.run_batch(start, h, b, stop) for b, h in enumerate(hidden)]

    @torch.no_grad()
    def run_batch(self, start: int, hidden: torch.Tensor, b: int, stop: int | None = None, times: int = 1) -> torch.Tensor:
        """Run layers start..stop-1 on calibration batch b, given as `times` copies stacked along the batch."""
        for index in range(start, len(self.decoder) if stop is None else stop):
            kwargs = self.kwargs[index][b]
            if times > 1:
                kwargs = repeat_batch(kwargs, hidden.shape[0] // times, times)
            hidden = first(self.decoder[index](hidden, **kwargs))
        return hidden


class _Replay(nn.Module):
    """Stands in for a sub-module and returns a given output, whatever it is called with."""

    def __init__(self, output):
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


class LayerProbe:
    """One decoder layer on its cached inputs, with what a candidate does not change recorded.

    Recorded per calibration batch: the attention output, the MoE block's input x and the outputs
    of its shared experts (and gates). A candidate set K then costs only its experts' outputs:
    summing `expert_output` (w_e f_e(x)) slot by slot is what the condensed experts module does
    (same order, dtype and shapes), `moe_output` runs the block's own code with the experts module and shared
    modules replaced by those tensors, and `layer_outputs` runs the layer's own code around it.
    Each result is bit-identical to running the condensed layer.
    """

    @torch.no_grad()
    def __init__(self, cache: CachedLayers, index: int):
        self.cache, self.index, self.adapter = cache, index, cache.adapter
        self.layer = cache.decoder[index]
        self.block = self.adapter.moe_block(self.layer)
        self.experts = self.adapter.experts(self.block)
        self.moe_attr = self.adapter.moe_attr
        self.attention: list = []
        self.moe_inputs: list[torch.Tensor] = []
        self.shared_names = [name for name in self.adapter.shared_expert_attrs if getattr(self.block, name, None) is not None]
        self.shared: dict[str, list] = {name: [] for name in self.shared_names}
        handles = [
            self.layer.self_attn.register_forward_hook(lambda _m, _a, output: self.attention.append(output)),
            getattr(self.layer, self.moe_attr).register_forward_pre_hook(lambda _m, args: self.moe_inputs.append(args[0])),
        ]
        for name in self.shared_names:
            handles.append(getattr(self.block, name).register_forward_hook(lambda _m, _a, output, name=name: self.shared[name].append(output)))
        try:
            self.reference = cache.run(index, cache.inputs(index), index + 1)
        finally:
            for handle in handles:
                handle.remove()
        every_output = sum(x.numel() * x.element_size() for x in self.moe_inputs) * self.adapter.num_experts(self.block)
        self._keep_expert_outputs = every_output <= EXPERT_CACHE_BYTES
        self._expert_outputs: dict[tuple[int, int], torch.Tensor] = {}

    def expert_output(self, b: int, expert: int, weight: torch.Tensor) -> torch.Tensor:
        """w_e f_e(x) on batch b's flattened MoE input, in the model's dtype (kept for later steps if small)."""
        if (b, expert) in self._expert_outputs:
            return self._expert_outputs[(b, expert)]
        x = self.moe_inputs[b]
        flat = x.reshape(-1, x.shape[-1])
        output = weight.float().to(flat.dtype) * expert_forward(self.experts, expert, flat)
        if self._keep_expert_outputs:
            self._expert_outputs[(b, expert)] = output
        return output

    @torch.no_grad()
    def moe_output(self, b: int, experts_output: torch.Tensor) -> torch.Tensor:
        """The condensed block's output on batch b, given the summed weighted expert outputs."""
        empty = torch.zeros(0, dtype=torch.float64)
        replaced = {self.adapter.experts_attr: _Replay(experts_output)}
        replaced |= {name: _Replay(self.shared[name][b]) for name in self.shared_names}
        originals = {name: getattr(self.block, name) for name in replaced}
        with condensed(self.adapter, self.block, [], empty):
            for name, module in replaced.items():
                setattr(self.block, name, module)
            try:
                return first(self.block(self.moe_inputs[b]))
            finally:
                for name, module in originals.items():
                    setattr(self.block, name, module)

    @torch.no_grad()
    def layer_outputs(self, b: int, moe_outputs: list[torch.Tensor]) -> torch.Tensor:
        """The layer's output on batch b for each candidate MoE output, stacked along the batch: [C*B, S, H]."""
        times = len(moe_outputs)
        attention = self.attention[b]
        replayed_attention = (attention[0].repeat(times, 1, 1), *attention[1:]) if isinstance(attention, tuple) else attention.repeat(times, 1, 1)
        moe = torch.cat(moe_outputs)
        # The pre-MoE norm only feeds the MoE, whose output is given: its work is skipped too.
        replaced = {"self_attn": _Replay(replayed_attention), self.moe_attr: _Replay((moe, None) if self.adapter.moe_returns_tuple else moe)}
        if hasattr(self.layer, self.adapter.pre_moe_norm_attr):
            replaced[self.adapter.pre_moe_norm_attr] = _Replay(None)
        originals = {name: getattr(self.layer, name) for name in replaced}
        for name, module in replaced.items():
            setattr(self.layer, name, module)
        try:
            hidden = self.cache.inputs(self.index)[b]
            return first(self.layer(hidden.repeat(times, 1, 1), **self.cache.kwargs[self.index][b]))
        finally:
            for name, module in originals.items():
                setattr(self.layer, name, module)
