"""The Python API: the same code paths the CLI uses.

    import moe_compress as mc
    result = mc.compress("ref-mixtral", method="reap", ratio=0.25, out="pruned/")
    print(result.summary)
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import distributed
from .arch.adapter import MoEAdapter
from .arch.registry import get_adapter
from .data.batches import CalibrationSpec, batches_fingerprint, calibration_batches, check_seq_len
from .errors import MoECompressError
from .evaluate.size import model_size
from .finite import require_finite_numbers, require_finite_statistics, require_finite_weights
from .io.export import carried_keys, keeps_stored_format, raw_groups, streamed_groups
from .io.load import check_device, resolve_model
from .io.open import Streaming, available_bytes, open_model
from .io.output_lock import releases_outputs
from .io.residency import InMemoryWeights, StreamedWeights, Weights
from .io.save import check_output_dir, save_with_summary
from .methods import PlanRequest, get_method
from .methods.budget import Budget
from .methods.condense import plan_condense
from .methods.condense_state import SearchState, default_state_path, state_key
from .methods.structural import ConsecutiveScore, Mode, Unit, distance_needed, plan_drop
from .methods.uniform import check_uniform, plan_outcome, uniform_plan
from .observe.cache import StatsCache, cache_key, config_fingerprint, content_fingerprint
from .observe.observer import observe_expert_statistics
from .observe.similarity import observe_similarities
from .plan import ModelIdentity, Plan
from .preflight import Structure, check_condense, check_condense_memory, check_prunable
from .surgery.experts import apply_layer_plan, apply_plan
from .surgery.structure import experts_per_layer

Calibration = CalibrationSpec | str | list[torch.Tensor]
UNITS = get_args(Unit)
MODES = get_args(Mode)


@dataclass
class CompressionResult:
    """What a compression call produced. `model` is None after a streamed run: the result is `output_dir`."""

    model: PreTrainedModel | None
    plan: Plan | None  # None on ranks other than 0 of a distributed run
    summary: dict = field(default_factory=dict)
    output_dir: Path | None = None
    #: With `uniform=True`: the global plan that `plan` was rounded from (never applied).
    global_plan: Plan | None = None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _calibration_batches(calib: Calibration, tokenizer: PreTrainedTokenizerBase | None, config: object = None) -> list[torch.Tensor]:
    """Token batches from any calibration form; with `config`, windows must fit the model's positions."""
    if isinstance(calib, list):
        if not calib or not all(isinstance(b, torch.Tensor) and b.dim() == 2 for b in calib):
            raise MoECompressError("calibration batches must be a non-empty list of [batch, seq_len] token-id tensors.")
        if config is not None:
            check_seq_len(max(b.shape[1] for b in calib), config, "calibration sequence length")
        return calib
    spec = calib if isinstance(calib, CalibrationSpec) else CalibrationSpec(source=str(calib))
    spec.validate()
    if config is not None:
        check_seq_len(spec.seq_len, config)
    return calibration_batches(tokenizer, spec)


def weights_fingerprint(model: PreTrainedModel, weights: Weights | None = None) -> tuple[str, str]:
    """(fingerprint, kind): every byte of an in-memory model ("content"); the checkpoint's
    headers, sizes and mtimes for a streamed one, whose weights are not in memory ("checkpoint")."""
    if isinstance(weights, StreamedWeights):
        return weights.checkpoint.fingerprint(), "checkpoint"
    return content_fingerprint(model), "content"


def router_rows(model: PreTrainedModel, adapter: MoEAdapter) -> dict[int, int]:
    """Router rows per MoE layer: the expert dimension of every statistic observed there."""
    layers = adapter.decoder_layers(model)
    return {i: adapter.router_size(adapter.moe_block(layers[i])) for i in adapter.moe_layer_indices(model)}


def model_identity(model: PreTrainedModel, adapter: MoEAdapter, weights: Weights | None = None) -> ModelIdentity:
    """What a plan made for `model` records, and what a plan applied to it is checked against.

    Besides the run's own fingerprint (`weights_fingerprint`), weights that this run read
    unchanged from a checkpoint are also fingerprinted by its headers (cheap), so a plan made
    in memory can be checked by a streamed run and the other way round.
    """
    groups, per_token = adapter.routing_groups(model.config)
    fingerprint, kind = weights_fingerprint(model, weights)
    fingerprints = {kind: fingerprint}
    source = weights.checkpoint if weights is not None else None
    if source is not None and "checkpoint" not in fingerprints:
        fingerprints["checkpoint"] = source.fingerprint()
    return ModelIdentity(
        model_type=adapter.model_type,
        num_layers=len(adapter.decoder_layers(model)),
        experts_per_layer=experts_per_layer(model, adapter),
        top_k=adapter.top_k(model.config),
        hidden_size=int(model.config.get_text_config().hidden_size),
        routing_groups=groups,
        groups_per_token=per_token,
        fingerprints=fingerprints,
        dtype=str(model.dtype).removeprefix("torch."),
    )


def superset_statistics(names: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """`names` plus every statistic a registered pruning method needs with its default options.

    What one cached calibration pass collects, so that the next method on the same model and
    data reads the cache instead of calibrating again. Its cost over the statistics one method
    needs is small: the expert outputs the observer captures anyway feed most of them (REAP,
    EAN, MoNE's moments), and C-Prune's signatures run every expert on a probe of 64 tokens per
    batch. Merging methods (family "merging") are left out: their statistics may run every
    expert on every token.
    """
    from .methods import METHODS

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


@releases_outputs
def compress(
    model: PreTrainedModel | Weights | str | Path,
    method: str = "reap",
    ratio: float = 0.25,
    budget: Budget = "layer",
    calib: Calibration = CalibrationSpec(samples=128),
    tokenizer: PreTrainedTokenizerBase | None = None,
    plan: Plan | str | Path | None = None,
    ignore_plan_identity: bool = False,
    out: str | Path | None = None,
    overwrite: bool = False,
    min_keep: int = 0,
    options: dict | None = None,
    cache_dir: str | Path | None | bool = None,
    device: str = "cpu",
    streaming: Streaming = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    uniform: bool = False,
) -> CompressionResult:
    """Compress the routed experts of `model`, and save the result to `out` if given.

    Either `method` (any name in `moe_compress.methods.METHODS`, with its `options`) +
    `ratio` + `budget` decide from calibration statistics, or `plan` (a Plan or a plan JSON
    file) says what to do directly and no calibration runs; such a plan must have been made
    for this model (`Plan.check_identity`), and one whose weights fingerprint does not match or
    cannot be compared is refused unless `ignore_plan_identity` (then it costs a warning). An in-memory model is changed in place; a
    checkpoint path is streamed layer by layer when `streaming` says so (see `open_model`),
    and the result then exists only as the checkpoint written to `out`. `trust_remote_code`
    lets a checkpoint's own Python code run (see `io.load`). The default calibration, 128
    bundled sequences of 256 tokens, is what a CPU affords; the papers use more (REAP
    1 024 x 2 048 tokens, the unified framework 128 x 2 048, C-Prune 1 000 x 128, MoNE 100 x 4 096).
    `uniform=True` (with `budget="global"`) rounds the global plan to the same count in every MoE
    layer, a stock checkpoint (see `methods.uniform`); `summary["uniform"]` then holds what both
    plans keep and their sizes, and `result.global_plan` the global plan.
    """
    start = time.perf_counter()
    require_finite_numbers([("ratio", ratio), *((f"option {k!r}", v) for k, v in (options or {}).items())])
    if uniform:
        check_uniform(method, budget, plan is not None)
    plan_inputs = [plan] if isinstance(plan, str | Path) else []
    model, tokenizer, adapter, weights = _prepare(model, tokenizer, out, overwrite, device, streaming, dtype, trust_remote_code, plan_inputs)
    before = model_size(model, adapter)
    identity = model_identity(model, adapter, weights)
    from_cache = False
    global_plan = None
    if plan is None:
        check_prunable(model, adapter)
        chosen = get_method(method)
        batches = _calibration_batches(calib, tokenizer, model.config)
        stats, from_cache = collect_statistics(model, batches, chosen.needs(options), cache_dir, device, weights, identity.own_fingerprint)
        if not distributed.is_main():
            return _other_rank_result()
        request = PlanRequest(adapter, model.config, stats, ratio, budget, min_keep, model=model, weights=weights)
        plan = chosen.make_plan(request, options)
        if uniform:
            global_plan, plan = plan, uniform_plan(chosen, request, options, plan)
            global_plan.identity = identity
        plan.identity = identity
    else:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        plan.check_identity(identity, ignore_plan_identity)
    return _apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, from_cache, weights, global_plan)


def _other_rank_result() -> CompressionResult:
    """What a rank other than 0 returns: it helped calibrate; rank 0 plans and writes (then all meet at a barrier)."""
    distributed.barrier()
    return CompressionResult(None, None, {"rank": distributed.rank()}, None)


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
    weights: Weights,
    global_plan: Plan | None = None,
) -> CompressionResult:
    """Apply `plan`, summarise what changed, and save if asked: the tail every stage shares.

    Streamed, the plan is applied to a copy of the (meta) skeleton, which describes the
    output's structure and config, while the writer applies it to each layer read from disk.
    A `global_plan` that `plan` was rounded from is summarised beside it, never applied.
    Under torchrun only rank 0 gets past this point's first line; the others wait for it.
    """
    if not distributed.is_main():
        return _other_rank_result()
    groups = None
    carried = carried_keys(model, weights)
    outcomes = {"global": plan_outcome(model, adapter, global_plan), "uniform": plan_outcome(model, adapter, plan)} if global_plan else None
    if weights.streamed:
        model = copy.deepcopy(model)
    else:
        weights.checkpoint = None  # changed in place below: no longer the checkpoint's content
    apply_plan(model, plan, adapter)
    stored_format = "as loaded"
    if weights.streamed:
        groups = streamed_groups(weights, adapter, plan, apply_layer_plan)
        if weights.quantization is not None:
            method = weights.quantization.config.get("quant_method")
            if keeps_stored_format(plan, model):
                groups = raw_groups(weights, adapter, plan)
                model.config.quantization_config = weights.quantization.config
                stored_format = f"{method}, as stored (experts sliced with their scales)"
            else:
                stored_format = f"{model.dtype} (dequantised: a {method} checkpoint keeps its format only under plans that keep or remove whole experts and blocks into a stock checkpoint)"
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
        "streamed": weights.streamed,
        # checkpoint tensors transformers does not load (e.g. multi-token-prediction layers), carried into the output
        "carried_tensors": len(carried),
        "weights_format": stored_format,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if outcomes:
        summary["uniform"] = outcomes
    output_dir = save_with_summary(model, out, tokenizer, plan, summary, overwrite, groups)
    distributed.barrier()
    return CompressionResult(None if weights.streamed else model, plan, summary, output_dir, global_plan)


def _source_of(model: PreTrainedModel | Weights | str | Path) -> str | Path | None:
    """Where a model was read from: what an output may not overwrite."""
    if isinstance(model, str | Path):
        return model
    if isinstance(model, StreamedWeights | InMemoryWeights):
        return model.checkpoint.directory if model.checkpoint is not None else getattr(model.model, "name_or_path", None)
    return getattr(model, "name_or_path", None)


def _prepare(model, tokenizer, out, overwrite, device, streaming: Streaming = False, dtype: str = "auto", trust_remote_code: bool = False, inputs=()):
    """Shared start of every stage: check the device and the output first, open the model if
    given a name, and refuse non-finite weights of an in-memory model (`load_model` checks
    those it loads)."""
    check_device(device)
    if out is not None:
        check_output_dir(out, overwrite, [_source_of(model), *inputs])
    if isinstance(model, PreTrainedModel):
        require_finite_weights(model)
    model, loaded_tokenizer, weights = open_model(model, device, streaming, dtype, trust_remote_code)
    if weights.streamed and out is None:
        raise MoECompressError("a streamed run keeps no model in memory: give an output directory (out=...) to write the result to.")
    return model, tokenizer or loaded_tokenizer, get_adapter(model), weights


@releases_outputs
def drop(
    model: PreTrainedModel | Weights | str | Path,
    unit: Unit = "moe",
    n: int | None = None,
    target_ratio: float | None = None,
    mode: Mode = "discrete",
    calib: Calibration = CalibrationSpec(samples=128),
    tokenizer: PreTrainedTokenizerBase | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    streaming: Streaming = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    consecutive_score: ConsecutiveScore = "span",
) -> CompressionResult:
    """Layer drop (unit="moe": MoE sub-layers) or block drop (unit="block": whole decoder layers).

    Scores are residual-stream cosine similarities on calibration data (see
    `methods.structural`); give `n` units or a `target_ratio` of parameters to remove.
    `consecutive_score="framework"` scores a consecutive run of n blocks as the unified
    framework's code does, by cos(h_i, h_{i+n+1}).
    """
    start = time.perf_counter()
    if unit not in UNITS:
        raise MoECompressError(f"unit must be one of {', '.join(UNITS)} (MoE sub-layers or whole blocks); got {unit!r}.")
    if mode not in MODES:
        raise MoECompressError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    require_finite_numbers([("target_ratio", target_ratio)])
    model, tokenizer, adapter, weights = _prepare(model, tokenizer, out, overwrite, device, streaming, dtype, trust_remote_code)
    before = model_size(model, adapter)
    if unit == "moe":
        adapter.require_separate_moe()
    identity = model_identity(model, adapter, weights)
    batches = _calibration_batches(calib, tokenizer, model.config)
    distance = distance_needed(model, adapter, unit, mode, n, target_ratio, consecutive_score)
    scores = observe_similarities(model, adapter, batches, distance, weights, device)
    if unit == "moe" and len(scores.moe) < len(adapter.moe_layer_indices(model)):
        raise MoECompressError(
            f"{adapter.model_type} carries several residual streams (hyper-connections): a MoE sub-layer's input and its "
            "layer's output cannot be compared, so MoE sub-layers cannot be scored for dropping; drop whole blocks (unit='block')."
        )
    require_finite_numbers([(f"similarity of MoE layer {k}", v) for k, v in scores.moe.items()])
    require_finite_numbers([(f"similarity of blocks {i}..{i + d}", v) for d, row in scores.blocks.items() for i, v in enumerate(row)])
    if not distributed.is_main():
        return _other_rank_result()
    plan = plan_drop(model, adapter, scores, unit, n, target_ratio, mode, consecutive_score)
    plan.identity = identity
    return _apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, False, weights)


@releases_outputs
def condense(
    model: PreTrainedModel | str | Path,
    layers: int = 1,
    experts: int | None = None,
    objective: str = "layer_output",
    choose_size: bool = False,
    position_stride: int = 1,
    calib: Calibration = CalibrationSpec(samples=32),
    tokenizer: PreTrainedTokenizerBase | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None | bool = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    state_file: str | Path | None | bool = None,
    fresh: bool = False,
) -> CompressionResult:
    """CD-MoE: condense `layers` MoE layers into shared experts + `experts` constant-weight experts each.

    Defaults follow the authors' code (see `methods.condense`): K = the model's top-k (6 for
    DeepSeekMoE-16B, as they use), K = 0 for shared experts only, JSD of the layer output for
    the expert step and of the final normed hidden state for the layer step. Calibration: 32
    sequences of 256 tokens (the authors use 100 C4 texts of up to 256 tokens; 32 keeps the
    search within minutes on a CPU). The search saves its progress to `state_file` (default: under
    the cache directory, keyed by model, data and settings; False: none) and resumes from it;
    `fresh` discards a saved state first. Its cost is in `result.plan.meta`.
    """
    start = time.perf_counter()
    if isinstance(model, str | Path) and Path(resolve_model(model)).is_dir() and isinstance(calib, CalibrationSpec):
        check_condense_memory(Path(resolve_model(model)), calib.samples, calib.seq_len, available_bytes("cpu"))
    model, tokenizer, adapter, weights = _prepare(model, tokenizer, out, overwrite, device, trust_remote_code=trust_remote_code)
    check_condense(Structure(model, adapter), layers, experts)  # before calibrating
    before = model_size(model, adapter)
    identity = model_identity(model, adapter, weights)
    batches = _calibration_batches(calib, tokenizer, model.config)
    stats, from_cache = collect_statistics(model, batches, ("gate_sum", "selected"), cache_dir, device, fingerprint=identity.own_fingerprint)
    experts = adapter.top_k(model.config) if experts is None else experts
    settings = {"experts": experts, "objective": objective, "choose_size": choose_size, "position_stride": position_stride}
    key = state_key(identity.own_fingerprint, batches_fingerprint(batches), settings)
    path = None if state_file is False or (state_file is None and cache_dir is False) else (
        Path(state_file) if state_file else default_state_path(key, cache_dir or None)
    )
    if fresh and path is not None and path.is_file():
        path.unlink()
    state = SearchState.open(key, path)
    plan = plan_condense(model, adapter, batches, stats, layers, experts, objective, choose_size, position_stride, state)
    plan.identity = identity
    plan.meta["state_file"] = str(path) if path else None
    return _apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, from_cache, InMemoryWeights(model))
