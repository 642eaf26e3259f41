"""Observed statistics, collected once per model and data and kept in the disk cache."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Observation:
    """What a calibration pass that missed the cache observes (`observed`: the superset when caching) and
    how its result is kept: `finish` checks it, caches it (rank 0) and returns the statistics asked for."""

    names: tuple[str, ...]
    observed: tuple[str, ...]
    cache: StatsCache | None
    key: str

    def finish(self, stats: dict[int, dict[str, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
        require_finite_statistics(stats)
        if self.cache and distributed.is_main():
            self.cache.save(self.key, stats)
        return {layer: self.asked(named) for layer, named in stats.items()}

    def observe(self, model: PreTrainedModel, batches: list[torch.Tensor], device: str = "cpu", weights: Weights | None = None) -> dict[int, dict[str, torch.Tensor]]:
        """Walk the calibration data through `model` for the statistics observed, then `finish`."""
        return self.finish(observe_expert_statistics(model, get_adapter(model), batches, self.observed, device, weights))

    def asked(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One layer's statistics, restricted to those asked for."""
        return {name: named[name] for name in self.names}


def look_up_statistics(
    model: PreTrainedModel,
    batches: list[torch.Tensor],
    names: tuple[str, ...],
    cache_dir: str | Path | None | bool = None,
    weights: Weights | None = None,
    fingerprint: str | None = None,
    superset: bool = True,
) -> tuple[dict[int, dict[str, torch.Tensor]] | None, Observation]:
    """The cached statistics `names` of this model and data (None on a miss), and the observation a miss needs
    (see `collect_statistics`, which is this followed by that observation)."""
    adapter = get_adapter(model)
    names = tuple(sorted(set(names) | {"tokens"}))
    cache = None if cache_dir is False else StatsCache(cache_dir or None)
    expected = router_rows(model, adapter)
    key = ""
    if cache:
        fingerprint = fingerprint or weights_fingerprint(model, weights)[0]
        key = cache_key(fingerprint, batches_fingerprint(batches), config_fingerprint(model.config))
    cached = cache.load(key, expected, names) if cache else None
    observation = Observation(names, superset_statistics(names) if cache and superset else names, cache, key)
    if distributed.combine(torch.tensor([cached is not None], dtype=torch.int64), torch.minimum).item():
        return cached, observation
    return None, observation


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
    cached, observation = look_up_statistics(model, batches, names, cache_dir, weights, fingerprint, superset)
    if cached is not None:
        return cached, True
    return observation.observe(model, batches, device, weights), False
