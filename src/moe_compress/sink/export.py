"""What the output checkpoint holds, produced group by group from an in-memory or a streamed model.

A compressed checkpoint is written in groups: the stem (embeddings and whatever precedes
the decoder layers), each decoder layer, the head (final norm and output embeddings), and
the *carried* tensors -- checkpoint tensors transformers does not load (DeepSeek-V3's and
GLM's multi-token-prediction layers), which are copied, renumbered after dropped blocks and
pruned with the plan where they hold experts. Both sources go through the same writer:

* `memory_groups`: the model is in memory and already compressed;
* `streamed_groups`: each layer is read from the checkpoint, compressed by
  the plan's layer surgery (`surgery.experts.apply_layer_plan`, passed in), handed to the writer and dropped before the next one is read;
* `walk_groups`: each layer is written during a layer walk's visit (slimming; a prune planned during its
  calibration walk, `engine.fused`).

A streamed and an in-memory run therefore write the same bytes.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..plan import LayerPlan, Plan
from ..source.checkpoint import Checkpoint
from ..source.origin import ORIGIN, Origin
from ..source.residency import StreamedWeights, layers_prefix, module_names, split_names
from .stored_views import KeptExperts, PrunedLayer, reverted
from .writer import ShardWriter

#: (tensors, whether they already carry checkpoint names) -- in-memory names are converted on write.
Group = tuple[dict[str, torch.Tensor], bool]
Transform = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
#: apply_layer_plan(layer, adapter, plan, layer_plan, hidden_size): one layer's surgery, in place.
LayerSurgery = Callable[[nn.Module, MoEAdapter, Plan, LayerPlan, int], None]


def memory_groups(model: PreTrainedModel, adapter: MoEAdapter) -> Iterator[Group]:
    """The groups of a model held in memory (already compressed)."""
    state = model.state_dict()
    stem, layers, head = split_names(model, adapter, state)
    yield {name: state[name] for name in stem}, False
    for index in sorted(layers):
        yield {name: state[name] for name in layers[index]}, False
    yield {name: state[name] for name in head}, False


def model_groups(model: PreTrainedModel) -> Iterator[Group]:
    """Every group of an in-memory model, and the tensors it carries from the checkpoint it was loaded from."""
    from ..arch.registry import get_adapter

    adapter = get_adapter(model)
    yield from memory_groups(model, adapter)
    origin: Origin | None = getattr(model, ORIGIN, None)
    if origin is not None and origin.carried:
        yield from carried_groups(origin.checkpoint, origin.carried, origin.plans, adapter, origin.num_layers)


def _part_group(weights: StreamedWeights, names: list[str]) -> Group:
    with weights.loaded_names(names):
        state = weights.model.state_dict()
        return {name: state[name] for name in names}, False


def streamed_groups(weights: StreamedWeights, adapter: MoEAdapter, plan: Plan | None, apply_layer: LayerSurgery | None = None) -> Iterator[Group]:
    """The groups of the compressed model, each layer read from disk, compressed by the plan and
    released in turn, then the carried tensors.

    `apply_layer` does the plan's surgery on one layer; the caller passes it (the writer knows
    no surgery, so the sink does not import the stages that feed it). A plan needs one.
    """
    if plan is not None and apply_layer is None:
        raise ValueError("streamed_groups needs apply_layer to apply a plan")
    model = weights.model
    stem, _, head = split_names(model, adapter, model.state_dict(keep_vars=True))
    yield _part_group(weights, stem)
    layers = adapter.decoder_layers(model)
    prefix = layers_prefix(model, adapter)
    dropped = set(plan.dropped_blocks) if plan else set()
    decisions = {lp.layer: lp for lp in plan.layers} if plan else {}
    kept = [i for i in range(len(layers)) if i not in dropped]
    for new_index, index in enumerate(kept):
        original = layers[index]
        work = copy.deepcopy(original)  # meta: costs nothing; the skeleton keeps its original layer
        layers[index] = work
        try:
            weights.materialize(weights.state_names(work))
            # in place: each tensor the surgery replaces is freed as soon as its slice exists
            if index in decisions:
                apply_layer(work, adapter, plan, decisions[index], model.config.get_text_config().hidden_size)
            group = {f"{prefix}.{new_index}.{name}": value for name, value in work.state_dict().items()}
        finally:
            layers[index] = original
        yield group, False
        del group
    yield _part_group(weights, head)
    weights.drop_buffers()  # the head was the last read: kept for a next layer, it sat on whatever follows the write (the guard)
    yield from carried_groups(weights.checkpoint, weights.carried, [plan] if plan else [], adapter, len(layers))


def keeps_stored_format(plan: Plan | None, output_model: PreTrainedModel) -> bool:
    """Whether a pre-quantised checkpoint can be written in its own format under `plan`: only when the
    plan keeps or removes whole experts and blocks and the output is a stock checkpoint. Anything
    that creates new weights (novices, merges, condensed layers) or needs generated code is
    written dequantised."""
    if getattr(output_model.config, "moe_compress", None):
        return False
    return plan is None or all(lp.action == "keep" for lp in plan.layers)


def raw_groups(weights: StreamedWeights, adapter: MoEAdapter, plan: Plan | None) -> Iterator[Group]:
    """The output of a keep/remove plan built from the checkpoint's stored tensors, never dequantised.

    Each in-memory tensor's checkpoint keys (transformers' own mapping: per-expert keys and
    their FP8 block scales, or fused MXFP4 blocks and scales) are copied as stored: keys of a
    dropped block are left out and later blocks renumbered; a removed expert's keys are left out
    and the kept ones renumbered (or, for tensors stored fused, sliced along their expert axis);
    router rows and correction biases are sliced. The result loads wherever the original does.
    """
    model = weights.model
    stem, per_layer, head = split_names(model, adapter, model.state_dict(keep_vars=True))
    names = module_names(model)
    layers = adapter.decoder_layers(model)
    dropped = set(plan.dropped_blocks) if plan else set()
    decisions = {lp.layer: lp for lp in plan.layers if len(lp.keep) < lp.num_experts} if plan else {}

    def stored(names_: list[str]) -> dict[str, torch.Tensor]:
        return {key: weights.checkpoint.read(key) for name in names_ for key in weights.targets.get(name, [])}

    yield stored(stem), True
    for new_index, index in enumerate(i for i in range(len(layers)) if i not in dropped):
        lp, group = decisions.get(index), {}
        sliced: dict[str, int] = {}
        if lp is not None:
            block = adapter.moe_block(layers[index])
            for tensor in adapter.expert_tensors(block):
                sliced[f"{names[id(tensor.module)]}.{tensor.name}"] = tensor.axis
        keep = torch.tensor(sorted(lp.keep)) if lp is not None else None
        for name in per_layer[index]:
            for key in weights.targets.get(name, []):
                new_key = _renumber(key, _LAYER, index, new_index)
                if name not in sliced:
                    group[new_key] = weights.checkpoint.read(key)
                    continue
                expert = _EXPERT.search(key)
                if expert is None:  # stored with all experts in one tensor (routers, fused MXFP4 experts)
                    group[new_key] = weights.checkpoint.read(key).index_select(sliced[name], keep).contiguous()
                elif int(expert.group(1)) in lp.keep:
                    group[_renumber(new_key, _EXPERT, int(expert.group(1)), sorted(lp.keep).index(int(expert.group(1))))] = (
                        weights.checkpoint.read(key)
                    )
        yield group, True
    yield stored(head), True
    yield from carried_groups(weights.checkpoint, weights.carried, [plan] if plan else [], adapter, len(layers))


def _renumber(key: str, pattern: re.Pattern, old: int, new: int) -> str:
    found = pattern.search(key)
    assert found is not None and int(found.group(found.lastindex)) == old
    return key[: found.start(found.lastindex)] + str(new) + key[found.end(found.lastindex) :]


def walk_groups(
    weights: StreamedWeights, adapter: MoEAdapter, walk: Iterable[tuple[int, nn.Module]], plans: Callable[[], list[Plan]] | None = None,
    kept: Callable[[int], dict[str, KeptExperts]] | None = None,
) -> Iterator[Group]:
    """The groups of a model that a layer walk changes (slimming in place; a fused prune, `engine.fused`, in
    copies): each layer is written during its visit, while the walk still holds it. `plans()`, asked once
    the walk is over, are those the carried tensors are pruned with (none for slimming). `kept(index)`: a
    layer's routed expert tensors left whole, by layer-relative name, of which the kept experts are
    written (`sink.stored_views`)."""
    model = weights.model
    stem, _, head = split_names(model, adapter, model.state_dict(keep_vars=True))
    prefix = layers_prefix(model, adapter)
    yield _part_group(weights, stem)
    for index, layer in walk:
        group = {f"{prefix}.{index}.{name}": value for name, value in layer.state_dict().items()}
        experts = kept(index) if kept is not None else {}
        yield (PrunedLayer(group, {f"{prefix}.{index}.{name}": e for name, e in experts.items()}) if experts else group), False
        del layer, group, experts  # a pruned copy would otherwise stay alive through the walk's visit of the next layer
    yield _part_group(weights, head)
    weights.drop_buffers()  # as in `streamed_groups`: the head is the last read, and the guard may follow
    yield from carried_groups(weights.checkpoint, weights.carried, plans() if plans else [], adapter, len(adapter.decoder_layers(model)))


def carried_keys(model: PreTrainedModel, weights: StreamedWeights | None = None) -> list[str]:
    """Checkpoint tensors transformers does not load that a save of `model` carries over."""
    if weights is not None and weights.streamed:
        return weights.carried
    origin: Origin | None = getattr(model, ORIGIN, None)
    return origin.carried if origin is not None else []


def note_plan(model: PreTrainedModel, plan: Plan) -> None:
    """Record a plan applied to an in-memory model, for the tensors its save carries."""
    origin: Origin | None = getattr(model, ORIGIN, None)
    if origin is not None:
        origin.plans.append(plan)


_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def carried_groups(checkpoint: Checkpoint, keys: list[str], plans: list[Plan], adapter: MoEAdapter, num_layers: int) -> Iterator[Group]:
    """Checkpoint tensors transformers does not load, carried into the output.

    Trailing layers (index >= the model's decoder layers: multi-token-prediction blocks) are
    renumbered past dropped blocks. Where a plan removes the same experts from every layer
    (a stock output), an MoE block among them keeps the experts the model's last MoE layer
    keeps, router rows and correction bias sliced alike, so the checkpoint stays consistent
    with the config's single expert count; anything else is copied unchanged.
    """
    for key in keys:
        tensor = checkpoint.read(key)
        layer = _LAYER.search(key)
        layers_before = num_layers
        for plan in plans:
            if layer is None or int(layer.group(2)) < layers_before:
                break
            index = int(layer.group(2)) - len(plan.dropped_blocks)
            key = key[: layer.start(2)] + str(index) + key[layer.end(2) :]
            layer = _LAYER.search(key)
            keep = _uniform_keep(plan)
            if keep is not None:
                key, tensor = _slice_experts(key, tensor, keep, adapter)
            if key is None:
                break
            layers_before -= len(plan.dropped_blocks)
        if key is not None:
            yield {key: tensor}, True


def _uniform_keep(plan: Plan) -> list[int] | None:
    """The last MoE layer's kept experts, when the plan removes experts the same way in every layer."""
    removing = [lp for lp in plan.layers if len(lp.keep) < lp.num_experts]
    if not removing or not plan.is_uniform() or any(lp.action not in ("keep", "merge") for lp in plan.layers):
        return None
    return sorted(max(plan.layers, key=lambda lp: lp.layer).keep)


def _slice_experts(key: str, tensor: torch.Tensor, keep: list[int], adapter: MoEAdapter) -> tuple[str | None, torch.Tensor]:
    expert = _EXPERT.search(key)
    if expert is not None:
        old = int(expert.group(1))
        if old not in keep:
            return None, tensor
        return key[: expert.start(1)] + str(keep.index(old)) + key[expert.end(1) :], tensor
    router = f".{adapter.moe_attr}.{adapter.router_attr}."
    for dotted, axis in adapter.router_expert_tensors:
        if key.endswith(router + dotted):
            return key, tensor.index_select(axis, torch.tensor(keep)).contiguous()
    return key, tensor


def write_groups(
    directory: Path,
    output_model: PreTrainedModel,
    groups: Iterable[Group],
    max_shard_bytes: int,
    transform: Transform | None = None,
) -> list[Path]:
    """Write every group as safetensors shards under `directory` (in the family's checkpoint key layout)."""
    tied = set(getattr(output_model, "all_tied_weights_keys", {}) or {})
    writer = ShardWriter(directory, max_shard_bytes)
    for tensors, in_checkpoint_names in groups:
        if not in_checkpoint_names:
            tensors = reverted(output_model, tensors, tied)
        if transform is not None:
            tensors = transform(tensors)
        writer.add(tensors)
        # Let go of this layer before the next one is read: the loop variable would keep it
        # (and the layer its views point into) alive through the next layer's materialisation.
        del tensors
    return writer.finish()
