"""CD-MoE: condense MoE layers into small dense layers, chosen by output divergence.

A condensed layer has no router: every token goes through the shared experts plus a fixed set
K_l of routed experts, each scaled by w_e, its mean gate weight when selected on calibration
data; the other routed experts are deleted.

Search (all divergences are the Jensen-Shannon divergence between the original and the
modified model's next-token distributions, averaged over calibration tokens):
  1. per layer, with only that layer condensed, grow K_l greedily from the empty set up to
     `max_experts` (default top_k), each step adding the expert that keeps the divergence
     lowest; K_l is the best set seen of size 1..max_experts, or exactly `max_experts`
     experts with `fixed_size`. (The divergence of the empty set, shared experts alone, is
     reported but not chosen: a layer with zero routed experts cannot be written in the
     family's per-expert checkpoint layout -- drop its MoE sub-layer instead.)
  2. order layers greedily: repeatedly add the layer whose condensing (together with the
     layers already chosen) keeps the divergence lowest; condense the first n.
Cost control: every decoder layer's input is cached once for all calibration batches, and
the original log-probabilities are computed once; each candidate re-runs only the layers
from the first modified one to the output. The number of candidate evaluations and the
search time are reported in the plan's meta.

Families without shared experts still work (the condensed layer is then just the weighted
kept experts); the method is meant for families with shared experts (DeepSeek, Qwen2-MoE,
GLM, Ernie), where the shared experts carry most of the layer.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..errors import MoECompressError
from ..observe.capture import capture_layer_inputs
from ..plan import LayerPlan, Plan
from ..progress import track
from ..runtime import condense

Stats = dict[int, dict[str, torch.Tensor]]


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of JSD(p || q) in nats, from log-probabilities [..., V].

    JSD = 1/2 sum(p log p + q log q) - sum(m log m) with m = (p + q) / 2: no stacked copies and no
    logsumexp, which made this the search's main cost (it runs hundreds of times on [tokens, vocab]
    tensors). float64, because for nearly equal p and q the terms cancel to ~1e-5 of their size.
    """
    log_p, log_q = log_p.double().reshape(-1, log_p.shape[-1]), log_q.double().reshape(-1, log_q.shape[-1])
    p, q = log_p.exp(), log_q.exp()
    m = 0.5 * (p + q)
    per_token = 0.5 * ((p * log_p).sum(-1) + (q * log_q).sum(-1)) - torch.xlogy(m, m).sum(-1)
    return per_token.clamp_min(0.0).mean()


def final_log_probs(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from the last decoder layer's output."""
    logits = model.get_output_embeddings()(model.get_decoder().norm(hidden)).float()
    return F.log_softmax(logits / getattr(model.config, "logits_scaling", 1.0), dim=-1)


class DivergenceEvaluator:
    """Divergence of a temporarily modified model from the original, re-running only what changed."""

    @torch.no_grad()
    def __init__(self, model: PreTrainedModel, adapter: MoEAdapter, batches: list[torch.Tensor]):
        self.model, self.adapter = model, adapter
        captured = capture_layer_inputs(model, adapter, batches)
        self.kwargs = captured.layer_kwargs
        self.inputs: list[list[torch.Tensor]] = []
        hidden = captured.hidden
        for index, layer in enumerate(adapter.decoder_layers(model)):
            self.inputs.append(hidden)
            hidden = [_first(layer(h, **kw)) for h, kw in zip(hidden, self.kwargs[index])]
        self.reference = [final_log_probs(model, h) for h in hidden]
        self.evaluations = 0

    @torch.no_grad()
    def divergence(self, start: int) -> float:
        """JSD of the model as it is now, running from decoder layer `start` on cached inputs."""
        self.evaluations += 1
        layers = self.adapter.decoder_layers(self.model)
        total, count = 0.0, 0
        for b, hidden in enumerate(self.inputs[start]):
            for index in range(start, len(layers)):
                hidden = _first(layers[index](hidden, **self.kwargs[index][b]))
            tokens = hidden.shape[0] * hidden.shape[1]
            total += float(js_divergence(self.reference[b], final_log_probs(self.model, hidden))) * tokens
            count += tokens
        return total / count


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def condensed(adapter: MoEAdapter, block: nn.Module, experts: list[int], weights: torch.Tensor):
    """Temporarily condense `block` onto `experts` (ids of its unsliced experts module)."""
    router, module = adapter.router(block), adapter.experts(block)
    original_class = type(module)
    device = module.down_proj.device
    condense(block, adapter.router_attr, adapter.experts_attr, weights[experts].float().to(device), torch.tensor(experts, device=device))
    try:
        yield
    finally:
        setattr(block, adapter.router_attr, router)
        module.__class__ = original_class


def mean_selected_gate(layer_stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """w_e: the mean gate weight of e over the tokens that selected it (0 if none did)."""
    return layer_stats["gate_sum"] / layer_stats["selected"].clamp_min(1)


def plan_condense(
    model: PreTrainedModel,
    adapter: MoEAdapter,
    batches: list[torch.Tensor],
    stats: Stats,
    layers: int,
    max_experts: int | None = None,
    fixed_size: bool = False,
) -> Plan:
    start_time = time.perf_counter()
    moe_layers = sorted(stats)
    if not 0 < layers <= len(moe_layers) - 1:
        raise MoECompressError(
            f"can condense 1..{len(moe_layers) - 1} of the {len(moe_layers)} MoE layers (one must keep routing); asked for {layers}."
        )
    top_k = adapter.top_k(model.config)
    size_limit = top_k if max_experts is None else max_experts
    if size_limit < 1:
        raise MoECompressError(f"max experts per condensed layer must be >= 1; got {size_limit}.")
    evaluator = DivergenceEvaluator(model, adapter, batches)
    decoder = adapter.decoder_layers(model)
    chosen: dict[int, list[int]] = {}
    curves: dict[int, list[float]] = {}
    for layer in track(moe_layers, "condense: per-layer search"):
        block = adapter.moe_block(decoder[layer])
        weights = mean_selected_gate(stats[layer])
        kept: list[int] = []
        with condensed(adapter, block, [], weights):
            history = [([], evaluator.divergence(layer))]
        for _ in range(min(size_limit, adapter.num_experts(block))):
            candidates = []
            for expert in range(adapter.num_experts(block)):
                if expert not in kept:
                    with condensed(adapter, block, kept + [expert], weights):
                        candidates.append((evaluator.divergence(layer), expert))
            best_divergence, best_expert = min(candidates)
            kept = kept + [best_expert]
            history.append((kept, best_divergence))
        best = history[-1] if fixed_size else min(history[1:], key=lambda item: item[1])
        chosen[layer] = sorted(best[0])
        curves[layer] = [d for _, d in history]

    order, order_divergence = [], []
    for _ in track(range(layers), "condense: layer order"):
        candidates = []
        for layer in moe_layers:
            if layer in order:
                continue
            group = order + [layer]
            with _all_condensed(adapter, decoder, {g: chosen[g] for g in group}, stats):
                candidates.append((evaluator.divergence(min(group)), layer))
        divergence, layer = min(candidates)
        order.append(layer)
        order_divergence.append(divergence)

    plan_layers = []
    for layer in sorted(order):
        weights = mean_selected_gate(stats[layer])
        experts = adapter.num_experts(adapter.moe_block(decoder[layer]))
        plan_layers.append(LayerPlan(layer, experts, chosen[layer], curves[layer], condensed_weights=[float(weights[e]) for e in chosen[layer]]))
    plan = Plan(adapter.model_type, top_k, plan_layers, method="cd-moe", num_layers=len(decoder))
    plan.meta = {
        "order": order,
        "order_jsd": order_divergence,
        "per_layer_jsd_by_size": {str(k): v for k, v in curves.items()},
        "candidate_sets": {str(k): v for k, v in chosen.items()},
        "evaluations": evaluator.evaluations,
        "search_seconds": round(time.perf_counter() - start_time, 2),
    }
    return plan


@contextmanager
def _all_condensed(adapter: MoEAdapter, decoder, sets: dict[int, list[int]], stats: Stats):
    with ExitStack() as stack:
        for layer, experts in sets.items():
            stack.enter_context(condensed(adapter, adapter.moe_block(decoder[layer]), experts, mean_selected_gate(stats[layer])))
        yield
