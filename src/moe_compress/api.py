"""The Python API: the same code paths the CLI uses.

    import moe_compress as mc
    result = mc.compress("ref-mixtral", method="reap", ratio=0.25, out="pruned/")
    print(result.summary)
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch.registry import get_adapter
from .data.batches import CalibrationSpec, batches_fingerprint, calibration_batches
from .errors import MoECompressError
from .evaluate.size import model_size
from .io.load import load_model
from .io.save import check_output_dir, save_with_summary
from .methods import PlanRequest, get_method
from .methods.budget import Budget
from .methods.condense import plan_condense
from .methods.structural import Mode, Unit, distance_needed, plan_drop
from .observe.cache import StatsCache, cache_key, model_fingerprint
from .observe.observer import observe_expert_statistics
from .observe.similarity import observe_similarities
from .plan import Plan
from .surgery.experts import apply_plan

Calibration = CalibrationSpec | str | list[torch.Tensor]


@dataclass
class CompressionResult:
    model: PreTrainedModel
    plan: Plan
    summary: dict = field(default_factory=dict)
    output_dir: Path | None = None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _calibration_batches(calib: Calibration, tokenizer: PreTrainedTokenizerBase | None) -> list[torch.Tensor]:
    if isinstance(calib, list):
        if not calib or not all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in calib):
            raise MoECompressError("calibration batches must be a non-empty list of [batch, seq_len] token-id tensors.")
        return calib
    spec = calib if isinstance(calib, CalibrationSpec) else CalibrationSpec(source=str(calib))
    return calibration_batches(tokenizer, spec)


def collect_statistics(
    model: PreTrainedModel,
    batches: list[torch.Tensor],
    names: tuple[str, ...],
    cache_dir: str | Path | None | bool = None,
    device: str = "cpu",
) -> tuple[dict[int, dict[str, torch.Tensor]], bool]:
    """Observed statistics, from the disk cache when this model and data were seen before.

    Returns (statistics, whether they came from the cache). `cache_dir=False` disables caching.
    """
    adapter = get_adapter(model)
    names = tuple(sorted(set(names) | {"tokens"}))
    cache = None if cache_dir is False else StatsCache(cache_dir or None)
    key = cache_key(model_fingerprint(model), batches_fingerprint(batches), names) if cache else ""
    if cache and (cached := cache.load(key)) is not None:
        return cached, True
    stats = observe_expert_statistics(model, adapter, batches, names, device)
    if cache:
        cache.save(key, stats)
    return stats, False


def compress(
    model: PreTrainedModel | str | Path,
    method: str = "reap",
    ratio: float = 0.25,
    budget: Budget = "layer",
    calib: Calibration = "bundled",
    tokenizer: PreTrainedTokenizerBase | None = None,
    plan: Plan | str | Path | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    min_keep: int = 0,
    options: dict | None = None,
    cache_dir: str | Path | None | bool = None,
    device: str = "cpu",
) -> CompressionResult:
    """Compress the routed experts of `model` in place, and save the result to `out` if given.

    Either `method` (any name in `moe_compress.methods.METHODS`, with its `options`) +
    `ratio` + `budget` decide from calibration statistics, or `plan` (a Plan or a plan JSON
    file) says what to do directly and no calibration runs.
    """
    start = time.perf_counter()
    model, tokenizer, adapter = _prepare(model, tokenizer, out, overwrite, device)
    before = model_size(model, adapter)
    from_cache = False
    if plan is None:
        chosen = get_method(method)
        batches = _calibration_batches(calib, tokenizer)
        stats, from_cache = collect_statistics(model, batches, chosen.needs(options), cache_dir, device)
        plan = chosen.make_plan(PlanRequest(adapter, model.config, stats, ratio, budget, min_keep, model=model), options)
    elif not isinstance(plan, Plan):
        plan = Plan.load(plan)
    return _apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, from_cache)


def _apply_and_report(
    model: PreTrainedModel,
    adapter,
    plan: Plan,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | Path | None,
    overwrite: bool,
    start: float,
    before,
    from_cache: bool,
) -> CompressionResult:
    """Apply `plan`, summarise what changed, and save if asked: the tail every stage shares."""
    apply_plan(model, plan, adapter)
    after = model_size(model, adapter)
    summary = {
        "method": plan.method,
        "ratio": plan.ratio,
        "budget": plan.budget,
        "experts_per_layer": {str(k): v for k, v in after.experts_per_layer.items()},
        "params_before": before.total,
        "params_after": after.total,
        "active_params_before": before.active_per_token,
        "active_params_after": after.active_per_token,
        "bytes_before": before.bytes,
        "bytes_after": after.bytes,
        "statistics_from_cache": from_cache,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    output_dir = save_with_summary(model, out, tokenizer, plan, summary, overwrite)
    return CompressionResult(model, plan, summary, output_dir)


def _prepare(model, tokenizer, out, overwrite, device):
    """Shared start of every stage: check the output first, load the model if given a name."""
    if out is not None:
        check_output_dir(out, overwrite)
    if isinstance(model, (str, Path)):
        model, loaded_tokenizer = load_model(model, device=device)
        tokenizer = tokenizer or loaded_tokenizer
    return model, tokenizer, get_adapter(model)


def drop(
    model: PreTrainedModel | str | Path,
    unit: Unit = "moe",
    n: int | None = None,
    target_ratio: float | None = None,
    mode: Mode = "discrete",
    calib: Calibration = "bundled",
    tokenizer: PreTrainedTokenizerBase | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> CompressionResult:
    """Layer drop (unit="moe": MoE sub-layers) or block drop (unit="block": whole decoder layers).

    Scores are residual-stream cosine similarities on calibration data (see
    `methods.structural`); give `n` units or a `target_ratio` of parameters to remove.
    """
    start = time.perf_counter()
    model, tokenizer, adapter = _prepare(model, tokenizer, out, overwrite, device)
    before = model_size(model, adapter)
    batches = _calibration_batches(calib, tokenizer)
    distance = distance_needed(model, adapter, unit, mode, n, target_ratio)
    scores = observe_similarities(model, adapter, batches, max_distance=distance)
    plan = plan_drop(model, adapter, scores, unit, n, target_ratio, mode)
    return _apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, False)


def condense(
    model: PreTrainedModel | str | Path,
    layers: int = 1,
    max_experts: int | None = None,
    fixed_size: bool = False,
    calib: Calibration = CalibrationSpec(samples=16),
    tokenizer: PreTrainedTokenizerBase | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None | bool = None,
    device: str = "cpu",
) -> CompressionResult:
    """CD-MoE: condense `layers` MoE layers into shared experts + a few constant-weight experts.

    See `methods.condense` for the search; its cost is in `result.plan.meta`.
    """
    start = time.perf_counter()
    model, tokenizer, adapter = _prepare(model, tokenizer, out, overwrite, device)
    before = model_size(model, adapter)
    batches = _calibration_batches(calib, tokenizer)
    stats, from_cache = collect_statistics(model, batches, ("gate_sum", "selected"), cache_dir, device)
    plan = plan_condense(model, adapter, batches, stats, layers, max_experts, fixed_size)
    return _apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, from_cache)
