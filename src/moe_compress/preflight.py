"""Checks that need only a model's structure, run before any calibration or evaluation starts.

A request that cannot succeed must fail in seconds, not after a calibration pass: a ratio
that leaves a layer fewer experts than its router picks, a drop of more layers than the model
has, condensing every MoE layer, sparsifying shared experts of a model that has none. Each
check reads only the model's structure -- layer and expert counts, top-k, which weights exist
-- so it works on a skeleton built on the meta device as well as on a loaded model, and gives
the same one-line error the run itself would give later.

`skeleton` builds that structure from the config (and, for a local checkpoint, its shard
headers) without reading a weight: what `--dry-run` inspects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch.adapter import MoEAdapter
from .arch.registry import get_adapter
from .errors import MoECompressError, OptionError, param
from .source.residency import StreamedWeights
from .plan import RoutingLimits
from .arch.structure import experts_per_layer, require_droppable


@dataclass
class Structure:
    """A model (or its meta skeleton) and its adapter: what the checks read."""

    model: PreTrainedModel
    adapter: MoEAdapter
    tokenizer: PreTrainedTokenizerBase | None = None
    weights: StreamedWeights | None = None  # where a skeleton's weights are (None: in memory, or a Hub id's config only)

    @classmethod
    def of(cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, weights: StreamedWeights | None = None) -> Structure:
        return cls(model, get_adapter(model), tokenizer, weights)

    @property
    def experts(self) -> dict[int, int]:
        return experts_per_layer(self.model, self.adapter)

    @property
    def top_k(self) -> int:
        return self.adapter.top_k(self.model.config)


def skeleton(model: str | Path, dtype: str = "auto", trust_remote_code: bool = False) -> Structure:
    """The model's structure without its weights: a local checkpoint opens lazily (config, shard
    headers, tokenizer); a Hub id is built from its config alone. It leaves glibc's mmap threshold
    as it is (`load_streamed`'s `pin`): pinned by fit's sizing, every block over 128 KiB of the
    in-memory fit after it was a mapping of its own, faulted in anew (ref-mixtral at 50 %: a fit
    of 11.3 s took 10.3 s without), and so was every block of a REAP prune run after it in the
    same process (5.3 s, 4.1 s in a process of its own)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .source.load import load_config, load_streamed, resolve_model

    if Path(resolve_model(model)).is_dir():
        weights, tokenizer = load_streamed(model, dtype, trust_remote_code, pin=False)
        return Structure.of(weights.model, tokenizer, weights)
    _, config = load_config(model, trust_remote_code)
    with init_empty_weights(include_buffers=False):
        built = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return Structure.of(built.eval())


def check_prunable(model, adapter) -> None:
    """Routed experts can be ranked only where every router row is a real expert: a MoNE output
    (router rows that point to novice vectors) or a condensed layer is refused before calibrating."""
    from .arch.structure import layer_structure

    for layer, entry in layer_structure(model, adapter).items():
        if entry.get("novices") or entry.get("condensed"):
            kind = "novice experts (a MoNE output)" if entry.get("novices") else "a condensed router (a CD-MoE output)"
            raise MoECompressError(
                f"MoE layer {layer} has {kind}: its experts cannot be pruned or merged again. "
                "Prune the original model with the combined ratio, or slim / quantize this one."
            )


def check_prune(
    structure: Structure, method: str, options: dict[str, Any], ratio: float, budget: str, min_keep: int = 0, uniform: bool = False,
    keep: dict[int, int] | None = None,
) -> dict[int, int] | None:
    """Method, its options, ratio and budget (and `uniform` with them); and that the ratio (or an explicit
    budget's `keep`) leaves every layer at least top-k experts (a condition every method shares). Returns the
    experts each layer keeps under a layer or explicit budget (a global budget decides per layer from the
    statistics: None)."""
    from .methods import get_method
    from .methods.budget import select_experts
    from .methods.uniform import check_uniform

    get_method(method).resolved_options(options)
    get_method(method).check_budget(budget)
    if uniform:
        check_uniform(method, budget)
    check_prunable(structure.model, structure.adapter)
    if min_keep < 0:
        raise OptionError("min_keep", f"must be >= 0; got {min_keep}.")
    placeholder = {layer: torch.zeros(count, dtype=torch.float64) for layer, count in structure.experts.items()}
    kept = select_experts(placeholder, ratio, budget, RoutingLimits(structure.top_k), min_keep=min_keep, keep=keep)  # type: ignore[arg-type]
    return {layer: len(ids) for layer, ids in kept.items()} if budget in ("layer", "explicit") else None


def check_drop(structure: Structure, unit: str, n: int | None, target_ratio: float | None, layers: list[int] | None = None) -> None:
    """Exactly one of n / target_ratio / layers, n within what the model has, layers among its MoE layers (or its blocks),
    one MoE layer left routing."""
    if layers is not None:
        require_droppable(structure.model, structure.adapter, unit, layers)
        return
    if (n is None) == (target_ratio is None):
        raise MoECompressError(f"give exactly one of {param('n')} N or {param('target_ratio')} R.")
    if target_ratio is not None and not 0.0 < target_ratio < 1.0:
        raise MoECompressError(f"target ratio must be in (0, 1); got {target_ratio}.")
    if n is None:
        return
    if unit == "moe":
        structure.adapter.require_separate_moe()
        count = len(structure.experts)
        if not 0 < n < count:
            raise MoECompressError(f"can drop 1..{count - 1} of the {count} MoE sub-layers (one must keep routing); asked for {n}.")
    else:
        blocks = len(structure.adapter.decoder_layers(structure.model))
        if not 0 < n < blocks:
            raise MoECompressError(f"can drop 1..{blocks - 1} blocks; asked for {n}.")


def check_condense(structure: Structure, layers: int, experts: int | None = None) -> None:
    """At least one MoE layer must keep routing; a condensed layer keeps 0 (shared experts only) to E experts.

    K = 0 keeps a layer's shared experts alone: on a layer without any, nothing would be left of
    its MoE sub-layer -- a layer drop under another name, which `drop --unit moe` does (and chooses) itself.
    """
    count = len(structure.experts)
    if not 0 < layers <= count - 1:
        raise MoECompressError(f"can condense 1..{count - 1} of the {count} MoE layers (one must keep routing); asked for {layers}.")
    fewest = min(structure.experts.values(), default=0)
    if experts is not None and not 0 <= experts <= fewest:
        raise MoECompressError(f"experts per condensed layer (K) must be 0..{fewest}, the routed experts of its layers; got {experts}.")
    if experts == 0:
        decoder_layers = structure.adapter.decoder_layers(structure.model)
        bare = [i for i in structure.experts if not structure.adapter.shared_experts(structure.adapter.moe_block(decoder_layers[i]))]
        if bare:
            raise MoECompressError(
                f"experts per condensed layer 0 keeps shared experts only, but MoE layer {bare[0]} has none, so condensing it would "
                "remove its MoE sub-layer whole: that is a layer drop; use `moe-compress drop --unit moe` (recipe stage: drop), or keep K >= 1."
            )


def condense_memory_bytes(source: Path, samples: int, seq_len: int) -> tuple[int, int]:
    """(checkpoint bytes, bytes of the cached layer inputs) the CD-MoE search holds in memory.

    The search reruns every later layer for each candidate, so it keeps the whole model and
    every decoder layer's input for the calibration tokens (`CachedLayers`), in the model dtype.
    """
    import json

    from .arch.adapter import text_config
    from .source.checkpoint import Checkpoint
    from transformers import AutoConfig

    config = text_config(AutoConfig.for_model(**json.loads((source / "config.json").read_text())))
    element = 4 if str(getattr(config, "dtype", None) or "").endswith("float32") else 2
    cached = config.num_hidden_layers * samples * seq_len * config.hidden_size * element
    return Checkpoint(source).total_bytes(), cached


def check_condense_memory(source: Path, samples: int, seq_len: int, available: int) -> None:
    """CD-MoE holds the model in memory: refuse, before loading it, what cannot fit."""
    weights, cached = condense_memory_bytes(source, samples, seq_len)
    if weights + cached > available:
        gib = 2**30
        raise MoECompressError(
            f"condense holds the whole model in memory (its search reruns every later layer for each candidate): about "
            f"{(weights + cached) / gib:.1f} GiB ({weights / gib:.1f} GiB of weights + {cached / gib:.1f} GiB of cached layer inputs), "
            f"and {available / gib:.1f} GiB are available. Use a machine with more memory or fewer {param('samples')}, or compress with "
            "prune / drop, which stream."
        )


def check_finetune(structure: Structure, condensed_before: bool) -> None:
    """Fine-tuning trains condensed layers: the model has some, or an earlier stage makes them."""
    spec = getattr(structure.model.config, "moe_compress", None) or {}
    has_condensed = any(layer.get("condensed") for layer in (spec.get("layers") or {}).values())
    if not (condensed_before or has_condensed):
        raise MoECompressError("this model has no condensed layers: nothing to fine-tune. Add a condense stage before finetune.")


def check_slim(structure: Structure, targets: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """Targets are known names and the model has weights of each."""
    from .slimming.apply import check_targets_present
    from .slimming.observe import check_targets

    chosen = check_targets(targets)
    check_targets_present(structure.model, structure.adapter, chosen)
    return chosen
