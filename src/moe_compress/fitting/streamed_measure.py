"""Every fit candidate measured in one walk over the decoder layers, each layer read from the checkpoint once.

The in-memory measurement (`fitting.measure`) copies the whole model per candidate; a model that
does not fit in memory cannot be copied. Here the held-out windows go through the layers as
calibration does (`walk.observer`): all windows through layer 0, then layer 1, ... Each layer is
read once, and every candidate's version of it is made from it in memory -- its experts kept by
the candidate's prune plan (`surgery.experts.apply_layer_plan`, the surgery the streamed prune
writes with), then rounded as its quantisation packs it (`fitting.simulate.simulate_layer`) -- and
run on that candidate's own activations, which are carried to the next layer. At the end the head
turns each set of final activations into log-probabilities one batch at a time, and each
candidate is compared with the original's (also carried) on the same batch, so the original's
log-probabilities are never stored whole.

What it costs: one activation set (windows x seq_len x hidden, in the model's dtype) per distinct
prefix of layer actions -- candidates that did the same to every layer so far share one set, and
the original is one of them -- so at most (candidates + 1) sets, twice while a layer turns its
inputs into outputs; with 5 candidates and 3 x 32 windows of 256 tokens at hidden 2048 in bf16,
2 x 6 x 96 MiB. Beside them, the layer as read and one candidate's copy of it at a time. The activation store spills to files beyond its budget
(`walk.activations`, `--max-activation-memory`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..arch.adapter import MoEAdapter
from ..arch.structure import experts_per_layer
from ..errors import MoECompressError
from ..methods import PlanRequest, get_method
from ..plan import Plan
from ..progress import track
from ..source.allocator import activation_heap
from ..source.residency import StreamedWeights, split_names
from ..methods.structural import plan_block_drop, plan_moe_drop
from ..stages.drop import Drop, moe_layers, original_indices
from ..stages.prune import Prune, removed_share
from ..stages.quantize import Quantize
from ..walk.activations import default_activations
from ..walk.capture import capture_layer_inputs, logits_from_final_hidden
from ..walk.observer import embedding_lookups, to_device
from .measure import ReferenceSide, WindowScores, next_token_log_probs, window_batches
from .search import Candidate
from .simulate import layer_roles, simulate_layer, simulated

#: One layer's action: (key, its plan, the plan's entry or None, its quantize stage or None, group, the layer's index once
#: the dropped blocks are gone); None: the layer as stored; `BLOCK_DROPPED`: the layer skipped, its inputs handed on.
Action = tuple | None
BLOCK_DROPPED = ("block dropped",)


def prune_plan(stage: Prune, adapter: MoEAdapter, model, stats: dict, weights: StreamedWeights) -> Plan:
    """The plan `stage` makes from `stats` (the calibration statistics fit collected, a superset of the method's),
    as `stages.prune.prune` makes it."""
    ratio = removed_share(stage.keep, experts_per_layer(model, adapter)) if stage.budget == "explicit" else stage.ratio
    request = PlanRequest(adapter, model.config, stats, ratio, stage.budget, stage.min_keep, model=model, weights=weights, keep=stage.keep)
    return get_method(stage.method).make_plan(request, dict(stage.options))


def layer_actions(candidate: Candidate, adapter: MoEAdapter, model, stats: dict, weights: StreamedWeights, layers: int, group: int) -> list:
    """Per decoder layer, what `candidate` does to it (see `Action`). Its stages are fit's: prune, explicit drops of MoE
    sub-layers and of blocks (each by its input's indices, which an earlier block drop renumbered), a quantize last."""
    plans, quantize, gone = [], None, []
    for stage in candidate.stages:
        if isinstance(stage, Prune):
            plans.append(prune_plan(stage, adapter, model, stats, weights))
        elif isinstance(stage, Drop) and stage.layers is not None:
            chosen = original_indices(moe_layers(stage.layers, stage.unit, stage.n, stage.target_ratio), gone)
            plans.append(plan_moe_drop(model, adapter, chosen) if stage.unit == "moe" else plan_block_drop(model, adapter, chosen))
            gone = sorted({*gone, *plans[-1].dropped_blocks})
        elif isinstance(stage, Quantize) and simulated(stage):
            quantize = stage
        else:
            raise MoECompressError(f"a streamed fit measures prune, explicit drop and round-to-nearest quantize stages; {stage.describe()} is none (a bug).")
    dropped = {block for plan in plans for block in plan.dropped_blocks}
    # a later plan's entry replaces an earlier one's: a layer fit drops keeps every expert in its prune plan
    decisions = {lp.layer: (plan, lp) for plan in plans for lp in plan.layers if not lp.untouched}
    actions: list[Action] = []
    for index in range(layers):
        plan, entry = decisions.get(index, (None, None))
        if index in dropped or (entry is None and quantize is None):
            actions.append(BLOCK_DROPPED if index in dropped else None)
            continue
        width = quantize.group_size if quantize is not None and quantize.group_size is not None else group
        position = index - sum(block < index for block in dropped)  # the quantize stage's number for it
        key = (entry.model_dump_json() if entry is not None else None, quantize.model_dump_json() if quantize is not None else None, width, position)
        actions.append((key, plan, entry, quantize, width, position))
    return actions


def _edited(layer: nn.Module, index: int, action, adapter: MoEAdapter, hidden_size: int, roles: dict[str, str]) -> nn.Module:
    """A copy of `layer` with `action` applied (the original stays as read, for the other candidates), rounded as the
    quantize stage rounds the layer it numbers `position` (`Action`).

    Where the action prunes, the copy starts out sharing the routed experts' tensors with `layer`: the
    surgery replaces them by the kept experts' slices (never writing to them), so a candidate costs
    its kept experts, not a second copy of the whole layer before the slicing. Anything still shared
    after it is copied before rounding in place."""
    from ..surgery.experts import apply_layer_plan

    _, plan, entry, quantize, group, position = action
    block = adapter.moe_block(layer)
    shared = [t.module._parameters.get(t.name, t.value) for t in adapter.routed_expert_tensors(block)] if entry is not None and block is not None else []
    edited = copy.deepcopy(layer, {id(tensor): tensor for tensor in shared})
    if entry is not None:
        apply_layer_plan(edited, adapter, plan, entry, hidden_size)
    if quantize is not None:
        originals = {tensor.data_ptr() for tensor in shared}
        for name, tensor in edited.named_parameters():
            if tensor.data_ptr() in originals:
                owner, _, attr = name.rpartition(".")
                setattr(edited.get_submodule(owner), attr, nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad))
        simulate_layer(edited, position, adapter, quantize, group, roles)
    return edited


@torch.no_grad()
def measure_streamed(weights: StreamedWeights, adapter: MoEAdapter, candidates: list[Candidate], stats: dict, windows: torch.Tensor,
                     group: int, bounds: list[int], device: str = "cpu") -> list[dict]:
    """Each candidate's KL, top-1 agreement and both perplexities against the original on `windows`, as
    `fitting.measure.Reference.compare` gives them, in one streamed walk (see the module docstring); with the
    number of windows (all: one walk measures every candidate on each, so nothing is raced) and the KL on the
    first slice of `bounds` (the race's, which the proxy's rank correlation reads), batched as the in-memory fit's."""
    model = weights.model
    if adapter.layer_state:
        raise MoECompressError(f"{adapter.model_type}: its layers hand state to the next one, which a streamed fit does not carry yet; "
                               "fit it in memory (streaming off).")
    config = model.config.get_text_config()
    batches, _ = window_batches(windows, config.vocab_size, bounds)
    layers = adapter.decoder_layers(model)
    actions = [layer_actions(c, adapter, model, stats, weights, len(layers), group) for c in candidates]
    roles = layer_roles(model, adapter)
    store = default_activations()
    try:
        stem, _, head = split_names(model, adapter, model.state_dict(keep_vars=True))
        with weights.loaded_names(stem, device, embedding_lookups(model, batches)), activation_heap():
            inputs = capture_layer_inputs(model, adapter, batches)
        # activation sets by the actions taken so far: the original's path is all None; candidates alike so far share one set
        original: tuple = ()
        sets = {original: [store.keep(h) for h in inputs.hidden]}
        paths = [original for _ in candidates]
        for index in track(range(len(layers)), "measuring candidates (layers)"):
            with weights.loaded(layers[index], device) as layer:
                new_sets = {(*original, None): _forward(layer, sets[original], inputs.layer_kwargs[index], store, device)}
                for c, path in enumerate(paths):
                    action = actions[c][index]
                    paths[c] = (*path, None if action is None else action[0])
                    if paths[c] in new_sets:
                        continue
                    if action is BLOCK_DROPPED:  # the block is gone: the next layer reads what this one would have
                        new_sets[paths[c]] = sets[path]
                        continue
                    edited = layer if action is None else _edited(layer, index, action, adapter, config.hidden_size, roles[index])
                    new_sets[paths[c]] = _forward(edited, sets[path], inputs.layer_kwargs[index], store, device)
                    del edited
            handed = {id(handles) for handles in new_sets.values()}
            for handles in sets.values():
                if id(handles) not in handed:
                    store.release(handles)
            sets, original = new_sets, (*original, None)
        totals = [WindowScores() for _ in candidates]
        with weights.loaded_names(stem + head, device):
            for b, batch in enumerate(batches):
                reference = ReferenceSide.of(_log_probs(model, adapter, batch, store.get(sets[original][b])), batch[:, 1:])
                for c, path in enumerate(paths):
                    mine = reference.log_probs if path == original else _log_probs(model, adapter, batch, store.get(sets[path][b]))
                    totals[c].add(mine, reference, batch[:, 1:])
    finally:
        store.close()
        weights.drop_buffers()
    return [{**total.summary(), "windows": total.windows, "first_slice_kl": total.mean_kl(bounds[0])} for total in totals]


def _forward(layer: nn.Module, hidden: list, kwargs: list[dict], store, device: str) -> list:
    """`layer` on every batch of one activation set; the outputs kept in the store."""
    outputs = []
    with activation_heap():
        for handle, arguments in zip(hidden, kwargs):
            out = layer(store.get(handle).to(device), **to_device(arguments, torch.device(device)))
            outputs.append(store.keep(out[0] if isinstance(out, tuple) else out))
    return outputs


def _log_probs(model, adapter: MoEAdapter, batch: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """As `fitting.measure` takes them from the whole model: log-softmax over the logits of every position but the last."""
    return next_token_log_probs(logits_from_final_hidden(model, adapter, batch, hidden))
