"""CD-MoE: condense MoE layers into small dense layers, chosen by greedy divergence searches.

A condensed layer has no router: every token goes through the shared experts plus a fixed set
K_l of routed experts, each scaled by w_e, its mean gate weight when selected on calibration
data; the other routed experts are deleted. K = 0 leaves the shared experts alone ("CD-MoE-S").

Reference (duterscmy/CD-MoE; `greedy_search/greedy_search_expert.py`, `greedy_search_layer.py`,
`get_weight/get_weight.py`), the default here (objective="layer_output"):
  1. expert step, every MoE layer on its own: with only that layer condensed, grow its expert
     list greedily, each step adding the expert whose condensed layer output stays closest to
     the original output -- JSD of the softmax over the hidden dimension of the decoder layer's
     output (`get_layer_output`, hidden_states[layer + 1], which for the last layer transformers
     returns after the final norm, so there the normed state) -- until it has K experts (`num_route_expert`,
     6 for DeepSeekMoE-16B, i.e. its top-k; here K defaults to the model's top-k). Smaller K are
     prefixes of the same order (the authors slice `[:prune_num_expert]`), and K = 0 skips it.
  2. layer step: greedily add the MoE layer whose condensing (with the layers already chosen,
     each on its first K experts) keeps the final normed hidden state (hidden_states[-1],
     softmax over the hidden dimension) closest to the original; condense the first n.
Ties go to the lower expert / layer index, as in the authors' loops. The calibration is 100 C4
texts of up to 256 tokens there; see `api.condense` for ours.

Options: objective="next_token" measures both steps on the next-token distribution instead
(moe-compress's earlier search), and choose_size=True keeps the prefix of size 1..K with the
lowest divergence instead of exactly K (also the earlier behaviour); position_stride scores the
next-token objective on every k-th position only.

Cost. The expert step with the reference objective needs only the layer's cached inputs: its
attention runs once, and each candidate costs its experts' forward on the MoE input plus
elementwise work (`condense_eval.LayerProbe`); candidates are scored stacked. The layer step
runs layers l..L from cached inputs, candidates after the first chosen layer from its condensed
outputs. Both stop a candidate early, exactly, once its partial divergence over the batches seen
exceeds a complete divergence (a mean of non-negative terms cannot come back down). Progress
shows the layer, step, candidates done, the best divergence of the step and an ETA; the state
after every greedy step is saved (`condense_state`), so an interrupted search resumes.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..errors import MoECompressError
from ..plan import CondenseLayer, Plan
from ..progress import status_bar
from .condense_eval import (
    STACK_BYTES,
    CachedLayers,
    JSDTarget,
    LayerProbe,
    all_condensed,
    final_normed,
    hidden_log_probs,
    mean_selected_gate,
    next_token_log_probs,
)
from .condense_state import SearchState

Objective = Literal["layer_output", "next_token"]
OBJECTIVES = ("layer_output", "next_token")
Stats = dict[int, dict[str, torch.Tensor]]


class CondenseSearch:
    """The two greedy searches over one model and one calibration set."""

    def __init__(self, model: PreTrainedModel, adapter: MoEAdapter, batches: list[torch.Tensor], stats: Stats,
                 objective: Objective, position_stride: int):
        self.model, self.adapter, self.objective, self.stride = model, adapter, objective, position_stride
        self.cache = CachedLayers(model, adapter, batches)
        self.weights = {layer: mean_selected_gate(s) for layer, s in stats.items()}
        with torch.no_grad():
            self.final_target = [JSDTarget(self._final_distribution(h)) for h in self.cache.final]
        self.evaluations = 0

    def _final_distribution(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.objective == "layer_output":
            return hidden_log_probs(final_normed(self.model, hidden))
        return next_token_log_probs(self.model, hidden, self.stride)

    @staticmethod
    def _stack_limit(batch: torch.Tensor) -> int:
        """How many candidates one stacked call may hold (their hidden states as float64)."""
        return max(1, STACK_BYTES // max(1, batch.numel() * 8))

    # ---- expert step --------------------------------------------------------------------
    def probe(self, layer: int) -> LayerProbe:
        return LayerProbe(self.cache, layer)

    def _batch_sums(self, probe: LayerProbe, b: int, order: list[int], chunk: list[int]) -> list[float]:
        """Summed per-token JSD on calibration batch b of `order` + [c] for each c in `chunk` (stacked)."""
        weights = self.weights[probe.index]
        x = probe.moe_inputs[b]
        prefix = torch.zeros(x.reshape(-1, x.shape[-1]).shape, dtype=x.dtype, device=x.device)
        for expert in order:  # the condensed experts module's running sum, slot by slot
            prefix = prefix + probe.expert_output(b, expert, weights[expert])
        outputs = [probe.moe_output(b, prefix + probe.expert_output(b, c, weights[c])) for c in chunk]
        stacked = probe.layer_outputs(b, outputs)
        if self.objective == "layer_output":
            # hidden_states[l + 1] as the authors read it: for the last layer transformers returns it after the final norm.
            seen = (lambda h: final_normed(self.model, h)) if probe.index == len(self.cache.decoder) - 1 else (lambda h: h)
            target = JSDTarget(hidden_log_probs(seen(probe.reference[b])))
            per_token = target.per_token(hidden_log_probs(seen(stacked)).unflatten(0, (len(chunk), -1))).flatten(1)
        else:  # later layers see the candidates stacked; the vocabulary is scored one candidate at a time
            final = self.cache.run_batch(probe.index + 1, stacked, b, times=len(chunk))
            per_token = torch.stack(
                [self.final_target[b].per_token(next_token_log_probs(self.model, h, self.stride)).flatten() for h in final.chunk(len(chunk))]
            )
        return per_token.sum(dim=1).tolist()  # per_token: [candidates, tokens]

    def _tokens(self, hidden: torch.Tensor) -> int:
        """Positions scored in one calibration batch."""
        positions = hidden.shape[-2] if self.objective == "layer_output" else -(-hidden.shape[-2] // self.stride)
        return hidden.shape[0] * positions

    @torch.no_grad()
    def expert_candidates(self, probe: LayerProbe, order: list[int], candidates: list[int], progress, status: str) -> list[float]:
        """Divergence of `order` + [c] for each candidate c (inf for those ruled out early), the probed layer alone.

        Early stop, exact: a divergence is a mean of non-negative terms, so a candidate's partial sum
        over the batches seen so far bounds its total from below. After the first batch the leading
        candidate is scored on every batch; any candidate whose lower bound then exceeds a complete
        total cannot win and is not scored further (equal bounds stay, so ties resolve as before).
        """
        batches, evaluate = len(probe.moe_inputs), lambda b, chunk: self._batch_sums(probe, b, order, chunk)
        total_tokens = sum(self._tokens(x) for x in probe.reference)
        sums, seen = {c: 0.0 for c in candidates}, {c: 0 for c in candidates}
        best = float("inf")  # the lowest complete divergence so far

        def score(b: int, alive: list[int]) -> None:
            limit = self._stack_limit(probe.moe_inputs[b])
            for start in range(0, len(alive), limit):
                chunk = alive[start : start + limit]
                for c, value in zip(chunk, evaluate(b, chunk)):
                    sums[c], seen[c] = sums[c] + value, seen[c] + 1

        for b in range(batches):
            alive = [c for c in candidates if seen[c] == b and sums[c] / total_tokens <= best]
            score(b, alive)
            if b == 0 and batches > 1 and alive:  # complete the leader: its total is the bound
                leader = min(alive, key=lambda c: (sums[c], c))
                for rest in range(1, batches):
                    score(rest, [leader])
            best = min([best] + [sums[c] / total_tokens for c in candidates if seen[c] == batches])
            resolved = [c for c in alive if seen[c] == batches or sums[c] / total_tokens > best]
            self.evaluations += len(resolved)
            progress.advance(f"{status} (this step {best:.3g})", len(resolved))
        return [sums[c] / total_tokens if seen[c] == batches else float("inf") for c in candidates]

    # ---- layer step ---------------------------------------------------------------------
    @torch.no_grad()
    def condensed_inputs(self, sets: dict[int, list[int]]) -> dict[int, list[torch.Tensor]]:
        """Inputs of layers min(sets)..L-1 with `sets` condensed, so that later candidates start there."""
        if not sets:
            return {}
        inputs, hidden = {}, self.cache.inputs(min(sets))
        with all_condensed(self.adapter, self.cache.decoder, sets, self.weights):
            for index in range(min(sets), len(self.cache.decoder)):
                inputs[index] = hidden
                hidden = self.cache.run(index, hidden, index + 1)
        return inputs

    @torch.no_grad()
    def group_divergence(self, start: int, hidden: list[torch.Tensor], sets: dict[int, list[int]], bound: float = float("inf")) -> float:
        """Divergence of the final output with every layer in `sets` condensed, running from layer `start` on `hidden`.

        Batch by batch; once the partial mean alone exceeds `bound` (a complete divergence of another
        candidate) the candidate cannot win and inf is returned.
        """
        total_tokens = sum(self._tokens(h) for h in self.cache.final)
        total = 0.0
        self.evaluations += 1
        with all_condensed(self.adapter, self.cache.decoder, sets, self.weights):
            for b, h in enumerate(hidden):
                output = self.cache.run_batch(start, h, b)
                total += float(self.final_target[b].per_token(self._final_distribution(output)).sum())
                if total / total_tokens > bound:
                    return float("inf")
        return total / total_tokens


def _check(layers: int, moe_layers: list[int], experts: int, smallest: int, objective: str, choose_size: bool, stride: int) -> None:
    if not 0 < layers <= len(moe_layers) - 1:
        raise MoECompressError(
            f"can condense 1..{len(moe_layers) - 1} of the {len(moe_layers)} MoE layers (one must keep routing); asked for {layers}."
        )
    if not 0 <= experts <= smallest:
        raise MoECompressError(f"a condensed layer keeps 0..{smallest} routed experts; asked for {experts}.")
    if objective not in OBJECTIVES:
        raise MoECompressError(f"condense objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    if choose_size and experts == 0:
        raise MoECompressError("choosing the best size needs at least one expert to choose from: pass experts >= 1.")
    if stride < 1:
        raise MoECompressError(f"position stride must be >= 1; got {stride}.")


def kept_set(order: list[int], divergences: list[float], experts: int, choose_size: bool) -> list[int]:
    """The first `experts` of the greedy order, or with choose_size the prefix with the lowest divergence."""
    if not choose_size:
        return sorted(order[:experts])
    size = min(range(1, experts + 1), key=lambda s: (divergences[s - 1], s))
    return sorted(order[:size])


def plan_condense(
    model: PreTrainedModel,
    adapter: MoEAdapter,
    batches: list[torch.Tensor],
    stats: Stats,
    layers: int,
    experts: int | None = None,
    objective: Objective = "layer_output",
    choose_size: bool = False,
    position_stride: int = 1,
    state: SearchState | None = None,
) -> Plan:
    start_time = time.perf_counter()
    moe_layers = sorted(stats)
    decoder = adapter.decoder_layers(model)
    sizes = {layer: adapter.num_experts(adapter.moe_block(decoder[layer])) for layer in moe_layers}
    top_k = adapter.top_k(model.config)
    experts = top_k if experts is None else experts
    _check(layers, moe_layers, experts, min(sizes.values()), objective, choose_size, position_stride)
    state = state or SearchState({})
    search = CondenseSearch(model, adapter, batches, stats, objective, position_stride)

    expert_work = sum(sizes[layer] - step for layer in moe_layers for step in range(experts))
    layer_work = sum(len(moe_layers) - step for step in range(layers))
    done = sum(sizes[layer] - step for layer in moe_layers for step in range(len(state.expert_orders.get(layer, []))))
    done += sum(len(moe_layers) - step for step in range(len(state.layer_order)))
    with status_bar("condense: searching", expert_work + layer_work, done) as progress:
        for layer in moe_layers:
            order = state.expert_orders.setdefault(layer, [])
            curve = state.expert_divergences.setdefault(layer, [])
            probe = search.probe(layer) if len(order) < experts else None
            while len(order) < experts:
                candidates = [e for e in range(sizes[layer]) if e not in order]
                status = f"layer {layer}: expert {len(order) + 1}/{experts}"
                divergences = search.expert_candidates(probe, order, candidates, progress, status)
                best, expert = min(zip(divergences, candidates))
                order.append(expert)
                curve.append(best)
                state.save()
        chosen = {layer: kept_set(state.expert_orders[layer], state.expert_divergences[layer], experts, choose_size) for layer in moe_layers}
        while len(state.layer_order) < layers:
            sets = {g: chosen[g] for g in state.layer_order}
            reached = search.condensed_inputs(sets)  # shared by every candidate after the first chosen layer
            scored = []
            for layer in moe_layers:
                if layer in state.layer_order:
                    continue
                hidden = reached.get(layer, search.cache.inputs(layer))
                bound = min(scored)[0] if scored else float("inf")
                scored.append((search.group_divergence(layer, hidden, {**sets, layer: chosen[layer]}, bound), layer))
                best = min(scored)[0]
                progress.advance(f"layer order {len(state.layer_order) + 1}/{layers}: best {best:.3g} (layer {min(scored)[1]})")
            divergence, layer = min(scored)
            state.layer_order.append(layer)
            state.layer_divergences.append(divergence)
            state.save()

    order = state.layer_order[:layers]
    plan_layers = [
        CondenseLayer(layer=layer, num_experts=sizes[layer], keep=chosen[layer], scores=state.expert_divergences[layer],
                      condensed_weights=[float(search.weights[layer][e]) for e in chosen[layer]])
        for layer in sorted(order)
    ]
    plan = Plan(model_type=adapter.model_type, top_k=top_k, layers=plan_layers, method="cd-moe", num_layers=len(decoder))
    plan.meta = {
        "objective": objective,
        "experts": experts,
        "choose_size": choose_size,
        "position_stride": position_stride,
        "order": order,
        "order_jsd": state.layer_divergences[:layers],
        "expert_orders": {str(k): v for k, v in state.expert_orders.items()},
        "per_layer_jsd_by_size": {str(k): v for k, v in state.expert_divergences.items()},
        "candidate_sets": {str(k): v for k, v in chosen.items()},
        "evaluations": search.evaluations,
        "search_seconds": round(time.perf_counter() - start_time, 2),
        "resumed": state.resumed,
    }
    return plan
