"""A streamed prune in one read of the checkpoint: each decoder layer is planned, cut and written
during its calibration visit, while the walk still holds it.

The general streamed prune (`engine.finish`) calibrates over every layer, plans from all the
statistics, then reads every layer again to write it (`sink.export.streamed_groups`). When the
plan of layer i depends only on layer i's statistics, that second read buys nothing: once the
layer has seen every calibration batch (its outputs, the next layer's inputs, come from the
original layer as before), its statistics are final, its plan is made, and it is cut and handed to
the shard writer through `sink.export.walk_groups` -- the shape slimming writes in. The cut is made
in place on a copy that takes the layer's tensors over (`StreamedWeights.take_over`): each replaced
expert tensor is freed as soon as its slice exists, so cutting costs no more memory than the
two-pass path's surgery on a layer it read again.

One thing in a layer plan is not the layer's own: the super-expert guard (`methods.super_experts`)
protects experts above a threshold taken over the first 75 % of the layers. `LayerPlanner` settles
it early: an expert whose maximum is at most a lower bound of the final threshold is no super
expert, so a layer whose removed experts all lie below it keeps its unguarded plan; a layer that
cannot be settled waits (the layers behind it too: shards are written in order) and is read
again once the threshold is known. Everything else -- the plan file (made from all statistics, as
before), the statistics cache, the config, the summary, the staging directory -- is as in the
two-pass path, and each layer written early is checked against the final plan.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import distributed
from ..arch.adapter import MoEAdapter, text_config
from ..finite import require_finite_statistics
from ..methods import PlanRequest
from ..methods.registry import PROTECT, Method
from ..methods.super_experts import STATISTIC, considered_layers, threshold_floor
from ..plan import LayerPlan, Plan
from ..runtime import OUTPUT_FORMAT_KEY, is_substitution
from ..sink.export import walk_groups
from ..sink.stored_views import KeptExperts
from ..sink.save import save_with_summary
from ..source.residency import StreamedWeights, Weights, layers_prefix, module_names
from ..surgery.experts import apply_layer_plan, apply_plan, keep_routing
from ..walk.observer import ExpertObserver, LayerWalk
from .finish import CompressionResult, outcome_summary
from .statistics import Observation


def fuses(method: Method, budget: str, options: dict | None, model: PreTrainedModel, weights: Weights, out: str | Path | None) -> bool:
    """Whether a prune whose statistics missed the cache plans and writes each layer during its calibration walk.

    All of these must hold; otherwise the statistics are collected first and `engine.finish` writes as before:
    * the model is streamed (in memory every layer is held anyway) and the result is saved (`out`);
    * budget 'layer' or 'explicit' with a method whose layer plan reads that layer's statistics alone
      (`Method.layer_local`): a global budget ranks experts across layers, so no layer's plan is known before
      the last layer was observed, and merging methods read expert weights while they plan;
    * one process: under torchrun a layer's statistics are final only once the ranks combined them, which
      `observe_expert_statistics` does after the walk;
    * full-precision weights: a pre-quantised checkpoint may be written as stored (`sink.export.raw_groups`),
      from its stored keys rather than from the walk's dequantised layers;
    * the default layout: the expert-substitution format (`sink.substitution`) rewrites every group with a
      transform built from the output's final structure, known only after the walk.
    """
    layout = (options or {}).get(OUTPUT_FORMAT_KEY, "pruned")
    return (
        weights.streamed
        and out is not None
        and budget in ("layer", "explicit")
        and method.layer_local
        and not distributed.active()
        and weights.quantization is None
        and layout == "pruned"
        and not is_substitution(getattr(model.config, "moe_compress", None))
    )


class LayerPlanner:
    """Each MoE layer's plan from the statistics observed so far, as soon as it is the one the method makes from all.

    `settled(layer, seen)` returns a plan (made from part of `seen`) whose entry for `layer` is final, or None
    while the super-expert guard cannot tell yet (see the module's note).
    """

    def __init__(self, method: Method, request: PlanRequest, options: dict | None, experts_per_layer: dict[int, int]):
        self.method, self.request, self.options = method, request, dict(options or {})
        self.guarded = method.resolved_options(options)[PROTECT]
        include = considered_layers(text_config(request.config).num_hidden_layers)
        self.considered = sorted(layer for layer in experts_per_layer if layer < include)
        self.total = sum(experts_per_layer[layer] for layer in self.considered)
        self._guarded_plan: Plan | None = None

    def _plan(self, stats: dict, options: dict) -> Plan:
        keep = None if self.request.keep is None else {k: v for k, v in self.request.keep.items() if k in stats}
        return self.method.make_plan(replace(self.request, stats=stats, keep=keep), options)

    def settled(self, layer: int, seen: dict[int, dict]) -> Plan | None:
        if self.guarded and layer in self.considered:
            if all(other in seen for other in self.considered):  # the guard's threshold is known: plan as the method does
                if self._guarded_plan is None:
                    self._guarded_plan = self._plan({other: seen[other] for other in self.considered}, self.options)
                return self._guarded_plan
            plan = self._plan({layer: seen[layer]}, {**self.options, PROTECT: False})
            floor = threshold_floor([seen[other][STATISTIC] for other in self.considered if other in seen], self.total)
            removed = entry(plan, layer).removed
            return plan if all(float(seen[layer][STATISTIC][e]) <= floor for e in removed) else None
        return self._plan({layer: seen[layer]}, {**self.options, PROTECT: False})


def entry(plan: Plan, layer: int) -> LayerPlan:
    return next(lp for lp in plan.layers if lp.layer == layer)


class FusedPrune:
    """The layers of a fused prune, in order, for `walk_groups`: each cut while the walk holds it, or read again
    after the walk when its plan was not settled in time. `finish()` makes the final plan, checks the layers
    written early against it and applies it to the output skeleton; it runs once the walk is over."""

    def __init__(self, walk: LayerWalk, observer: ExpertObserver, observation: Observation, planner: LayerPlanner,
                 weights: StreamedWeights, adapter: MoEAdapter):
        self.walk, self.observer, self.observation, self.planner = walk, observer, observation, planner
        self.weights, self.adapter = weights, adapter
        self.hidden_size = text_config(weights.model.config).hidden_size
        self.seen: dict[int, dict] = {}
        self.written: dict[int, Plan] = {}  # layer -> the plan its copy was cut by (absent for a layer with no plan entry)
        self.kept: dict[int, dict[str, KeptExperts]] = {}  # layer -> its routed experts, whole, until written
        self.prefix = layers_prefix(weights.model, adapter)
        self.plan: Plan | None = None

    def layers(self) -> Iterator[tuple[int, nn.Module]]:
        waiting: list[int] = []
        for index, layer in self.walk:
            if index in self.observer.accumulators:
                named = self.observer.accumulators[index].sums
                require_finite_statistics({index: named})
                self.seen[index] = self.observation.asked(named)
            waiting.append(index)
            while waiting:
                head = waiting[0]
                plan = self.planner.settled(head, self.seen) if head in self.seen else None
                if head in self.seen and plan is None:
                    break
                waiting.pop(0)
                if plan is not None:
                    self.written[head] = plan
                if head == index:
                    yield index, self._cut(layer, plan, index)
                else:  # settled late: read again (only what waited)
                    yield from self._reread(head, plan)
        self.finish()
        for index in waiting:
            yield from self._reread(index, self.plan if index in self.seen else None)

    def _cut(self, layer: nn.Module, plan: Plan | None, index: int) -> nn.Module:
        if plan is None:
            return layer
        work = self.weights.take_over(layer)  # the walk no longer needs it: cut in place, each original freed by its slice
        lp = entry(plan, index)
        kept = self._kept_experts(work, lp, index) if lp.action == "keep" and not lp.untouched else None
        if kept is None:
            apply_layer_plan(work, self.adapter, plan, lp, self.hidden_size)
        else:
            keep_routing(work, self.adapter, lp)
            self.kept[index] = kept
        return work

    def _kept_experts(self, work: nn.Module, lp: LayerPlan, index: int) -> dict[str, KeptExperts] | None:
        """The layer's routed expert tensors (by layer-relative name), each to be written from its read buffer
        (`sink.stored_views`), or None where one was not read by moving stored bytes (then it is cut)."""
        block = self.adapter.moe_block(work)
        routed, names = self.adapter.num_experts(block), module_names(work)
        found = {}
        for tensor in self.adapter.routed_expert_tensors(block):
            value, name = tensor.value.detach(), f"{names[id(tensor.module)]}.{tensor.name}"
            parts = self.weights.stored_parts(f"{self.prefix}.{index}.{name}", value)
            if parts is None or value.shape[0] != routed or not value.is_contiguous():
                return None
            found[name] = KeptExperts(value, tuple(sorted(lp.keep)), parts)
        return found

    def _reread(self, index: int, plan: Plan | None) -> Iterator[tuple[int, nn.Module]]:
        with self.weights.loaded(self.adapter.decoder_layers(self.weights.model)[index]) as layer:
            yield index, self._cut(layer, plan, index)

    def finish(self) -> None:
        stats = self.observation.finish({index: acc.sums for index, acc in self.observer.accumulators.items()})
        self.plan = self.planner.method.make_plan(replace(self.planner.request, stats=stats), self.planner.options)
        for index, early in self.written.items():
            final, used = (plan.novice_vectors.get(index) for plan in (self.plan, early))
            same_vectors = final is used or (final is not None and used is not None and torch.equal(final, used))
            if entry(self.plan, index) != entry(early, index) or not same_vectors:
                raise AssertionError(f"layer {index} was written by a plan that differs from the method's final plan; nothing was published")
        if self.plan.dropped_blocks:
            raise AssertionError("a layer-local pruning plan dropped blocks; nothing was published")


def fused_prune(
    method: Method, options: dict | None, request: PlanRequest, batches: list, observation: Observation, identity,
    tokenizer: PreTrainedTokenizerBase | None, out: str | Path, overwrite: bool, start: float, before, device: str,
) -> CompressionResult:
    """Calibrate, plan and write a streamed prune in one walk (see the module's note; `fuses` says when).

    `request` is the method's, without statistics (its model, adapter and weights are the streamed model's).
    """
    model, adapter, weights = request.model, request.adapter, request.weights
    observer = ExpertObserver(adapter, observation.observed)
    walk = LayerWalk(model, adapter, batches, observer, device, description="calibrating", weights=weights)
    fused = FusedPrune(walk, observer, observation, LayerPlanner(method, request, options, identity.experts_per_layer), weights, adapter)
    output = copy.deepcopy(model)  # meta: the output's structure once the final plan is applied
    summary: dict = {}

    def described() -> list[Plan]:  # the layers are written: the plan, the output's structure and the summary are final
        plan = fused.plan
        plan.identity = identity
        apply_plan(output, plan, adapter)
        summary.update(outcome_summary(output, adapter, plan, before, False, True, len(weights.carried), "as loaded", start))
        return [plan]  # what the carried tensors are pruned with

    groups = _conversions_of(weights.model, output, walk_groups(weights, adapter, fused.layers(), described, lambda i: fused.kept.pop(i, {})))
    output_dir = save_with_summary(output, out, tokenizer, lambda: fused.plan, summary, overwrite, groups)
    return CompressionResult(None, fused.plan, summary, output_dir)


def _conversions_of(source: nn.Module, output: nn.Module, groups: Iterator) -> Iterator:
    """`groups`, with the output skeleton kept up to date with the checkpoint conversions the source skeleton has
    recorded by then (transformers records them as it reads; the writer reverses them, `sink.export.write_groups`).
    The two-pass path copies the skeleton after its walk, with them; this one copies it before."""
    for group in groups:
        if "_weight_conversions" in source.__dict__:
            output._weight_conversions = source._weight_conversions
        yield group
        del group  # else this frame keeps the written layer alive through the walk's visit of the next one

