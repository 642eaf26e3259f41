"""Where a model's weights live while a stage works on it: all in memory, or streamed from disk.

Every stage walks the model one decoder layer at a time and asks for a module's weights only
while it needs them (`with weights.loaded(layer, device): ...`). The two residencies answer
that request differently:

* `InMemoryWeights` -- the whole model is in memory (small models): a module visits the
  compute device and goes home afterwards.
* `StreamedWeights` -- the model is a skeleton on the meta device; a module's tensors are
  read from the checkpoint's shards, converted by transformers' own key-conversion rules
  (per-expert keys on disk -> fused 3-D tensors in memory) in the compute dtype onto the
  compute device, and dropped again afterwards. Peak memory is one module, whatever the
  size of the checkpoint. Where a conversion only moves bytes, each key is read once into
  its place in a buffer the previous layer released (`source.direct`, `source.buffers`).

Stages therefore run the same code for a 12 M-parameter test model and a 1 T-parameter one.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..errors import MoECompressError
from ..finite import check_read, require_finite
from .alignment import aligned, is_aligned
from .buffers import BufferPool
from .checkpoint import Checkpoint
from .direct import DirectRead, plan_direct


def _like(reference: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` as a Parameter if `reference` is one (buffers stay plain tensors)."""
    return nn.Parameter(value, requires_grad=reference.requires_grad) if isinstance(reference, nn.Parameter) else value


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its dotted name in `model` (the root is '')."""
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False)}


def state_names(model: nn.Module, module: nn.Module, names: dict[int, str] | None = None) -> list[str]:
    """Full state-dict names of `module`'s parameters and persistent buffers."""
    prefix = (names or module_names(model))[id(module)]
    prefix = f"{prefix}." if prefix else ""
    return [prefix + name for name in module.state_dict(keep_vars=True)]


def shape_mismatch(name: str, found: tuple[int, ...], expected: tuple[int, ...]) -> MoECompressError:
    """The error for a stored tensor whose shape is not the one the config gives it."""
    return MoECompressError(
        f"checkpoint tensor for {name} has shape {tuple(found)}, but the config says {tuple(expected)}: "
        "the checkpoint and its config.json disagree. Re-download or re-save the checkpoint."
    )


def checkpoint_targets(model: PreTrainedModel, checkpoint: Checkpoint, conversions: list | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """({state name: checkpoint keys it is built from}, checkpoint keys the model does not load).

    Names come from transformers' own conversion rules for the model, the ones
    `from_pretrained` applies (e.g. per-expert keys on disk -> one fused tensor in memory).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    conversions = get_model_conversion_mapping(model) if conversions is None else conversions
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    expected = model.state_dict(keep_vars=True)
    targets: dict[str, list[str]] = {}
    carried: list[str] = []
    for key in checkpoint.keys():
        target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if target in expected:
            targets.setdefault(target, []).append(key)
        else:
            carried.append(key)
    return targets, carried


def layers_prefix(model: PreTrainedModel, adapter: MoEAdapter) -> str:
    return module_names(model)[id(adapter.decoder_layers(model))]


def head_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The modules after the decoder layers: the final norm and the output embeddings."""
    modules = [getattr(model.get_decoder(), "norm", None), model.get_output_embeddings()]
    return [m for m in modules if m is not None]


def split_names(model: PreTrainedModel, adapter: MoEAdapter, names: Iterable[str]) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """State names split into (stem, {layer index: names}, head), each in state-dict order."""
    prefix = layers_prefix(model, adapter) + "."
    all_names = module_names(model)
    head_prefixes = tuple(f"{all_names[id(m)]}." for m in head_modules(model))
    stem, layers, head = [], {}, []
    for name in names:
        if name.startswith(prefix):
            layers.setdefault(int(name[len(prefix) :].split(".", 1)[0]), []).append(name)
        elif name.startswith(head_prefixes):
            head.append(name)
        else:
            stem.append(name)
    return stem, layers, head


@contextmanager
def _sequential_loading() -> Iterator[None]:
    """transformers' loader without its reader threads.

    Each reader thread allocates from its own malloc arena, and memory freed into those
    arenas stays resident: measured on a 1.2 GB Qwen3-MoE layer, 1.1 GB remained after the
    layer was released. Reading sequentially returns it (and pread is disk-bound anyway).
    """
    previous = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HF_DEACTIVATE_ASYNC_LOAD"]
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous


class InMemoryWeights:
    """Weights already in memory; a module visits the compute device while it is used.

    `checkpoint` is the checkpoint this run read them from and has not changed since (None for
    a model handed over in memory, which may differ from any file): a plan's identity can then
    name them by the checkpoint's fingerprint too (`engine.identity.model_identity`).
    """

    streamed = False

    def __init__(self, model: PreTrainedModel, checkpoint: Checkpoint | None = None):
        self.model = model
        self.checkpoint = checkpoint

    @contextmanager
    def loaded_names(self, names: list[str], device: str | torch.device = "cpu", lookups: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """Nothing to read: the tensors are in memory already (and stay where they are)."""
        yield

    def drop_buffers(self) -> None:
        """Nothing kept: in-memory weights are never released."""

    @contextmanager
    def loaded(self, module: nn.Module, device: str | torch.device = "cpu") -> Iterator[nn.Module]:
        first = next(module.parameters(), None)
        home = first.device if first is not None else torch.device("cpu")
        module.to(device)
        try:
            yield module
        finally:
            module.to(home)


_UNSET = object()


@dataclass(frozen=True)
class PreQuantized:
    """A pre-quantised checkpoint's stored `quantization_config` and the quantizer that dequantises it on load."""

    config: dict
    quantizer: object


class StreamedWeights:
    """A skeleton model whose tensors are read from a checkpoint module by module.

    `targets` maps every in-memory state name to the checkpoint keys it is built from (one
    key, or one per expert for fused experts); checkpoint keys that map to no state name
    (multi-token-prediction layers, for instance) are `carried`: the writer copies them.
    """

    streamed = True

    def __init__(self, model: PreTrainedModel, checkpoint: Checkpoint, quantization: PreQuantized | None = None):
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model = model
        self.checkpoint = checkpoint
        self.quantization = quantization
        quantizer = quantization.quantizer if quantization else None
        self.conversions = get_model_conversion_mapping(model, None, quantizer)
        self.targets, self.carried = checkpoint_targets(model, checkpoint, self.conversions)
        self._expected = model.state_dict(keep_vars=True)  # the skeleton's names, for renaming keys (`source.direct`)
        self._names = module_names(model)
        self._plans: dict[tuple, DirectRead | None] = {}
        self._buffers = BufferPool()
        # Tied weights (lm_head = embed_tokens) are one tensor, stored under the name transformers keeps.
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        self.aliases = {alias: stored for alias, stored in tied.items() if alias not in self.targets and stored in self.targets}
        for alias, stored in self.aliases.items():
            self._set(alias, model.get_parameter(stored))
        # Parameters transformers keeps in float32 whatever the model's dtype (DeepSeek's correction bias).
        self.dtype_plan = model._get_dtype_plan(model.dtype)
        state = model.state_dict(keep_vars=True)
        for pattern, dtype in self.dtype_plan.items():
            for name, value in state.items():
                if re.search(pattern, name) and value.dtype != dtype:
                    self._set(name, _like(value, value.to(device="meta", dtype=dtype)))

    def state_names(self, module: nn.Module) -> list[str]:
        if id(module) not in self._names:  # a module swapped in since (e.g. a working copy of a layer)
            self._names = module_names(self.model)
        return state_names(self.model, module, self._names)

    def materialize(self, names: list[str], device: str | torch.device = "cpu", lookups: dict[str, torch.Tensor] | None = None) -> None:
        """Read the tensors behind state `names` into the skeleton, on `device`, in the skeleton's dtypes.

        `lookups` names tables the block only looks rows up in (an input embedding during a
        walk's stem), each with the rows it is known to look up: such a table is mapped from its
        shard rather than read (`Checkpoint.mapped`: the rows touched, not 0.6 GB for Qwen3's
        152 k-token vocabulary), and the known rows are checked as a first read checks.
        """
        wanted = [name for name in dict.fromkeys(self.aliases.get(name, name) for name in names) if name in self.targets]
        if not wanted:
            return
        state = self.model.state_dict(keep_vars=True)
        plans = {name: self._direct_plan(name, state[name]) for name in wanted} if torch.device(device).type == "cpu" else {}
        direct = {name: plan for name, plan in plans.items() if plan is not None}
        tables = {name: self.checkpoint.mapped(plan.parts[0][0], plan.dtype) for name, plan in direct.items()
                  if name in (lookups or {}) and plan.parts[0][1] is None}
        tables = {name: table for name, table in tables.items() if table is not None}
        buffers = {name: self._buffers.take(plan.shape, plan.dtype) for name, plan in direct.items() if name not in tables}
        self._buffers.clear()
        if direct:  # what transformers' loader records on the model for saving to reverse (`_load`)
            self.model._weight_conversions = [conversion for conversion in self.conversions if conversion.was_used()]
        for name, table in tables.items():
            check_read(table[lookups[name]], f"checkpoint tensor {direct[name].parts[0][0]}")
            self._set(name, _like(state[name], table))
        for name, buffer in buffers.items():
            self.checkpoint.read_into(direct[name].views(buffer))
            self._set(name, _like(state[name], buffer))
        self._load_converted([name for name in wanted if name not in direct], device)
        state = self.model.state_dict(keep_vars=True)
        read = [name for name in wanted if name in state and state[name].device.type != "meta"]
        for name in read:  # pread buffers are only 16-byte aligned; kernels may round by address (source.alignment), lookups do not
            if name not in tables and not is_aligned(state[name]):
                self._set(name, _like(state[name], aligned(state[name].detach())))
        for alias, stored in self.aliases.items():
            if stored in wanted:
                self._set(alias, self.model.get_parameter(stored))
        if self.quantization is not None:  # what was read is checked as read (`Checkpoint.first_read`); dequantising can overflow
            state = self.model.state_dict(keep_vars=True)
            for name in read:
                require_finite(state[name], f"checkpoint tensor {name}")

    def stored_parts(self, name: str, param: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
        """Where `param` (target `name`, experts along axis 0) was read from one stored tensor per expert and part:
        each part's (row offset, rows) in an expert's rows, in stored order; None where it was read otherwise."""
        read = self._direct_plan(name, param)
        if read is None or any(expert is None for _, expert, _, _ in read.parts):
            return None
        return tuple(dict.fromkeys((offset, rows) for _, _, offset, rows in read.parts))

    def _direct_plan(self, name: str, param: torch.Tensor) -> DirectRead | None:
        """How `name` is read without transformers' loader (`source.direct`), or None; worked out once per name."""
        key = (name, tuple(param.shape), param.dtype)
        if key not in self._plans:
            self._plans[key] = None if self.quantization is not None else plan_direct(
                self.checkpoint, self.targets[name], param, self.conversions, self.model.base_model_prefix, self._expected
            )
        return self._plans[key]

    def _load_converted(self, names: list[str], device: str | torch.device) -> None:
        """Targets `source.direct` cannot read, through transformers' loader and its conversion rules."""
        from transformers.modeling_utils import LoadStateDictConfig

        if not names:
            return
        config = LoadStateDictConfig(
            weight_mapping=self.conversions, device_map={"": str(device)}, dtype=self.model.dtype, dtype_plan=self.dtype_plan,
            hf_quantizer=self.quantization.quantizer if self.quantization else None,
        )
        with _sequential_loading():
            # One target at a time: a fused expert tensor is assembled from its per-expert parts
            # (the parts, then the stack: twice its size) before the next one is read.
            for name in names:
                self._load(self.targets[name], config)

    def _load(self, keys: list[str], config) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        # The loader records the conversions it used on the model, and saving reverses them; those of a
        # dequantising quantizer cannot be reversed, so the skeleton keeps the ones it had.
        recorded = self.model.__dict__.get("_weight_conversions", _UNSET)
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, self.checkpoint.lazy(keys), config)
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
            if self.quantization is not None:
                if recorded is _UNSET:
                    self.model.__dict__.pop("_weight_conversions", None)
                else:
                    self.model._weight_conversions = recorded
        if info.mismatched_keys:
            raise shape_mismatch(*sorted(info.mismatched_keys)[0])
        if info.conversion_errors:
            name, error = next(iter(info.conversion_errors.items()))
            raise MoECompressError(f"cannot convert checkpoint tensor(s) for {name}: {str(error).splitlines()[0]}")

    def _set(self, name: str, value: torch.Tensor) -> None:
        owner_name, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(owner_name)
        (owner._parameters if attr in owner._parameters else owner._buffers)[attr] = value

    def release(self, names: list[str], reuse: bool = True) -> None:
        """Drop the tensors behind state `names`: they return to the meta device (a tied pair stays tied).
        With `reuse` their memory is kept for the next layer's read (`source.buffers`), else it is only let go."""
        for name in dict.fromkeys(self.aliases.get(name, name) for name in names):
            owner_name, _, attr = name.rpartition(".")
            value = getattr(self.model.get_submodule(owner_name), attr)
            if value.device.type == "meta":
                continue
            if reuse:
                self._buffers.give(value)
            empty = _like(value, torch.empty_like(value, device="meta"))
            self._set(name, empty)
            for alias in (a for a, stored in self.aliases.items() if stored == name):
                self._set(alias, empty)

    def take_over(self, module: nn.Module) -> nn.Module:
        """A copy of the materialised `module` that owns its tensors from now on: the skeleton's module is back on the
        meta device and the buffer pool keeps none of them.

        Surgery in place on the copy then frees each tensor it replaces as soon as the replacement exists, as
        `sink.export.streamed_groups` does on a layer it read itself. A fused prune (`engine.fused`) cuts the layer its
        calibration walk holds this way; kept beside their slices until the walk released the layer (and then in
        the pool), the replaced experts cost their size again in peak memory.
        """
        work = copy.deepcopy(module, memo={id(t): t for t in (*module.parameters(), *module.buffers())})
        self.release(self.state_names(module), reuse=False)
        return work

    def drop_buffers(self) -> None:
        """Free the buffers released tensors left for the next layer (`source.buffers`): a walk that ends has no next layer."""
        self._buffers.clear()

    @contextmanager
    def borrowed(self, names: list[str], other: StreamedWeights) -> Iterator[None]:
        """`other`'s resident tensors behind `names` as this skeleton's too, for the block: one copy for two models
        whose tensors are the same (`source.identical`). Nothing is read, and nothing goes to this pool afterwards."""
        theirs, mine = other.model.state_dict(keep_vars=True), self.model.state_dict(keep_vars=True)
        for name in names:
            self._set(name, _like(mine[name], theirs[name].detach()))
        try:
            yield
        finally:
            for name in names:
                self._set(name, mine[name])

    def missing(self, names: list[str]) -> list[str]:
        """Names among `names` that are still on the meta device (not in the checkpoint)."""
        state = self.model.state_dict(keep_vars=True)
        return [name for name in names if state[name].device.type == "meta"]

    @contextmanager
    def loaded_names(self, names: list[str], device: str | torch.device = "cpu", lookups: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """The tensors behind state `names`, materialised for the duration of the block (`lookups`: see `materialize`)."""
        self.materialize(names, device, lookups)
        try:
            absent = self.missing(names)
            if absent:
                raise MoECompressError(
                    f"the checkpoint has no tensor for {absent[0]}"
                    + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                    + ": a shard is missing or the checkpoint does not match its config."
                )
            yield
        finally:
            self.release(names)

    @contextmanager
    def loaded(self, module: nn.Module, device: str | torch.device = "cpu") -> Iterator[nn.Module]:
        with self.loaded_names(self.state_names(module), device):
            yield module


Weights = InMemoryWeights | StreamedWeights
