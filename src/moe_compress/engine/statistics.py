"""Observed statistics, collected once per model and data and kept in the disk cache."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from .. import distributed
from ..arch.registry import get_adapter
from ..data.batches import batches_fingerprint
from ..finite import require_finite_statistics
from ..source.residency import Weights
from ..walk.cache import StatsCache, cache_key, config_fingerprint
from ..walk.observer import observe_expert_statistics
from .identity import router_rows, weights_fingerprint


def superset_statistics(names: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """`names` plus every statistic a registered pruning method needs with its default options.

    What one cached calibration pass collects, so that the next method on the same model and
    data reads the cache instead of calibrating again. Its cost over the statistics one method
    needs is small: the expert outputs the observer captures anyway feed most of them (REAP,
    EAN, MoNE's moments), and C-Prune's signatures run every expert on a probe of 64 tokens per
    batch. Merging methods (family "merging") are left out: their statistics may run every
    expert on every token.
    """
    from ..methods import METHODS

    union = {*names, "tokens"}
    for method in METHODS.values():
        if method.family == "pruning":
            union.update(method.needs())
    return tuple(sorted(union))


def collect_statistics(
    model: PreTrainedModel,
    batches: list[torch.Tensor],
    names: tuple[str, ...],
    cache_dir: str | Path | None | bool = None,
    device: str = "cpu",
    weights: Weights | None = None,
    fingerprint: str | None = None,
    superset: bool = True,
) -> tuple[dict[int, dict[str, torch.Tensor]], bool]:
    """Observed statistics `names`, from the disk cache when this model and data were seen before.

    Returns (statistics, whether they came from the cache). `cache_dir=False` disables caching.
    The cache key covers the weights (`fingerprint`, see `weights_fingerprint`; computed when
    not given), the config and the tokens; any cached entry holding every statistic asked for
    answers. On a miss with caching on, one pass collects `superset_statistics(names)` (unless
    `superset=False`) and caches all of it, so the other pruning methods find theirs there; only
    `names` (and "tokens") are returned. An entry that does not describe this model's MoE layers
    and expert counts is recomputed, never half-used.
    Under torchrun the cache is used only if every rank finds the entry; rank 0 writes it.
    """
    adapter = get_adapter(model)
    names = tuple(sorted(set(names) | {"tokens"}))
    cache = None if cache_dir is False else StatsCache(cache_dir or None)
    expected = router_rows(model, adapter)
    key = ""
    if cache:
        fingerprint = fingerprint or weights_fingerprint(model, weights)[0]
        key = cache_key(fingerprint, batches_fingerprint(batches), config_fingerprint(model.config))
    cached = cache.load(key, expected, names) if cache else None
    if distributed.combine(torch.tensor([cached is not None], dtype=torch.int64), torch.minimum).item():
        return cached, True
    observed = superset_statistics(names) if cache and superset else names
    stats = observe_expert_statistics(model, adapter, batches, observed, device, weights)
    require_finite_statistics(stats)
    if cache and distributed.is_main():
        cache.save(key, stats)
    return {layer: {name: named[name] for name in names} for layer, named in stats.items()}, False


