"""Expert pruning (and merging, and substitution): a method scores the routed experts from
calibration statistics and a plan says which to keep.

`prune` is the call that does it to one model (in memory, or streamed from a checkpoint);
`Prune` is the same as a stage of a composition (`mc.compress(model, [mc.Prune("reap", ratio=0.25), ...])`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from pydantic import TypeAdapter, ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import distributed
from ..data.batches import CalibrationSpec
from ..errors import MoECompressError
from ..engine.finish import CompressionResult, apply_and_report, other_rank_result
from ..engine.identity import model_identity
from ..engine.prepare import Calibration, calibration_batches, prepare
from ..engine.fused import fuses, fused_prune
from ..engine.statistics import look_up_statistics
from ..arch.size import model_size
from ..finite import require_finite_numbers
from ..source.open import Streaming
from ..sink.output_lock import releases_outputs
from ..source.residency import Weights
from ..methods import PlanRequest, get_method
from ..methods.budget import Budget, check_ratio, removed_count
from ..methods.uniform import check_uniform, uniform_plan
from ..plan import Plan
from ..preflight import Structure, check_prunable, check_prune
from .options import PruneOptions
from .base import Job, Stage, StageContext, StageOptionError, StageOutcome, describe_value, type_name
from .footprint import Footprint
from .registry import register_stage


@releases_outputs
def prune(
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
    keep: dict[int, int] | None = None,
) -> CompressionResult:
    """Compress the routed experts of `model`, and save the result to `out` if given.

    Either `method` (any name in `moe_compress.methods.METHODS`, with its `options`) +
    `ratio` + `budget` decide from calibration statistics, or `plan` (a Plan or a plan JSON
    file) says what to do directly and no calibration runs; such a plan must have been made
    for this model (`Plan.check_identity`), and one whose weights fingerprint does not match or
    cannot be compared is refused unless `ignore_plan_identity` (then it costs a warning). An in-memory model is changed in place; a
    checkpoint path is streamed layer by layer when `streaming` says so (see `open_model`),
    and the result then exists only as the checkpoint written to `out`. `trust_remote_code`
    lets a checkpoint's own Python code run (see `source.load`). The default calibration, 128
    bundled sequences of 256 tokens, is what a CPU affords; the papers use more (REAP
    1 024 x 2 048 tokens, the unified framework 128 x 2 048, C-Prune 1 000 x 128, MoNE 100 x 4 096).
    `uniform=True` (with `budget="global"`) rounds the global plan to the same count in every MoE
    layer, a stock checkpoint (see `methods.uniform`); `summary["uniform"]` then holds what both
    plans keep and their sizes, and `result.global_plan` the global plan.
    `budget="explicit"` with `keep={layer: count}` sets each MoE layer's kept count (what `fit`
    chose) and the method's scores pick which experts; the plan's ratio is then the share removed.
    """
    start = time.perf_counter()
    require_finite_numbers([("ratio", ratio), *((f"option {k!r}", v) for k, v in (options or {}).items())])
    if uniform:
        check_uniform(method, budget, plan is not None)
    plan_inputs = [plan] if isinstance(plan, str | Path) else []
    model, tokenizer, adapter, weights = prepare(model, tokenizer, out, overwrite, device, streaming, dtype, trust_remote_code, plan_inputs)
    before = model_size(model, adapter)
    identity = model_identity(model, adapter, weights)
    from_cache = False
    global_plan = None
    if plan is None:
        check_prunable(model, adapter)
        chosen = get_method(method)
        chosen.check_budget(budget)
        if budget == "explicit":
            ratio = removed_share(keep, identity.experts_per_layer)
        batches = calibration_batches(calib, tokenizer, model.config)
        stats, observation = look_up_statistics(model, batches, chosen.needs(options), cache_dir, weights, identity.own_fingerprint)
        request = PlanRequest(adapter, model.config, {}, ratio, budget, min_keep, model=model, weights=weights, keep=keep)
        from_cache = stats is not None
        if not from_cache and fuses(chosen, budget, options, model, weights, out):  # one read: each layer written during its visit
            return fused_prune(chosen, options, request, batches, observation, identity, tokenizer, out, overwrite, start, before, device)
        if not from_cache:
            stats = observation.observe(model, batches, device, weights)
        if not distributed.is_main():
            return other_rank_result()
        request = replace(request, stats=stats)
        plan = chosen.make_plan(request, options)
        if uniform:
            global_plan, plan = plan, uniform_plan(chosen, request, options, plan)
            global_plan.identity = identity
        plan.identity = identity
    else:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        plan.check_identity(identity, ignore_plan_identity)
    return apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, from_cache, weights, global_plan)


def removed_share(keep: dict[int, int] | None, experts: dict[int, int]) -> float:
    """The share of routed experts an explicit budget removes (what its plan records as the ratio)."""
    if not keep:
        raise MoECompressError("budget 'explicit' needs keep={layer: count}, the experts each MoE layer keeps.")
    total = sum(experts.values())
    return max(0.0, 1.0 - sum(min(keep.get(layer, count), count) for layer, count in experts.items()) / total)


def _fits(value: Any, annotation: Any) -> bool:
    """A method option takes values of its declared type (`methods.options.option_types`; an integer where a float is)."""
    try:
        TypeAdapter(annotation).validate_python(value, strict=True)
    except ValidationError:
        return False
    return True


@register_stage
class Prune(PruneOptions, Stage):
    """Remove, merge or substitute routed experts, chosen by a method from calibration statistics."""

    kind: ClassVar[str] = "prune"
    streams: ClassVar[bool] = True

    def __init__(self, method: str | None = None, /, **given: Any):
        if method is not None:
            given = {"method": method, **given}
        own = {k: v for k, v in given.items() if k in type(self).model_fields}
        extra = {k: v for k, v in given.items() if k not in type(self).model_fields}
        if extra:
            own["options"] = {**own.get("options", {}), **extra}
        super().__init__(**own)
        self._order = list(given)
        self._check_method_options()

    def _check_method_options(self) -> None:
        from ..methods.options import option_types

        defaults = option_types(get_method(self.method))  # its options and the guard every method takes, with their types
        known = sorted([*(f for f in type(self).model_fields if f != "options"), *defaults])
        for name, value in self.options.items():
            if name not in defaults:
                raise StageOptionError(self.kind, f"unknown option {name!r}; known: {', '.join(known)}.")
            if not _fits(value, defaults[name]):
                raise StageOptionError(self.kind, f"option {name!r} must be {type_name(defaults[name])}; got {describe_value(value)}.")
            require_finite_numbers([(f"option {name!r}", value)])

    def given(self) -> dict[str, Any]:
        """As a recipe writes them: the method's options beside the stage's own, in the order given."""
        shown: dict[str, Any] = {}
        for name in self._order:
            if name == "options":
                shown.update(self.options)
            else:
                shown[name] = getattr(self, name) if name in type(self).model_fields else self.options[name]
        return shown

    @classmethod
    def check_options(cls, options: dict[str, Any], planned: bool = False) -> None:
        if not planned:
            check_ratio(options["ratio"])
        if options["uniform"]:
            check_uniform(options["method"], options["budget"], planned)

    def run_one(self, model: Any, tokenizer: Any, job: Job) -> CompressionResult:
        return prune(model, **self.settings(), calib=job.calib, tokenizer=tokenizer, out=job.out, overwrite=job.overwrite, device=job.device, **job.extra)

    def check(self, structure: Structure, earlier) -> None:
        if self.keep and self.budget != "explicit":
            raise MoECompressError(f"keep sets each layer's count under budget 'explicit'; this stage's budget is {self.budget!r}.")
        check_prune(structure, self.method, dict(self.options), self.ratio, self.budget, self.min_keep, self.uniform, self.keep)

    def calibrates(self) -> str:
        return f"score experts with {self.method} (statistics are reused from the cache when this model and data were seen)"

    def explain(self, structure: Structure) -> list[str]:
        kept = check_prune(structure, self.method, dict(self.options), self.ratio, self.budget, self.min_keep, self.uniform, self.keep)
        shown = ", ".join(f"{k}={v}" for k, v in self.options.items())
        lines = [f"would remove {self.ratio:.0%} of the routed experts with {self.method}{f' ({shown})' if shown else ''}, {self.budget} budget"]
        if kept is not None:
            counts, experts = sorted(set(kept.values())), sorted(set(structure.experts.values()))
            lines.append(f"every MoE layer would keep {'/'.join(map(str, counts))} of {'/'.join(map(str, experts))} experts")
        elif self.uniform:
            lines.append("every MoE layer would keep the same count: the global plan's total (decided from the statistics) shared equally")
        else:
            lines.append(f"layers would keep different counts, decided from the statistics (each at least {max(structure.top_k, self.min_keep)})")
        return lines

    def predict(self, footprint: Footprint) -> Footprint:
        """A layer budget removes floor(E x ratio) of each layer; an explicit one keeps `keep`; a global one
        removes floor(sum E x ratio) in all (spread over the layers: an estimate). A substituting method's removed
        experts stay as novices (`Method.substitutes`), in the layout of its default output format (another: an estimate)."""
        novices = get_method(self.method).substitutes
        exact = not novices or self.options.get("output_format", "pruned") == "pruned"
        if self.budget == "explicit":
            keep = {i: (self.keep or {}).get(i, k) for i, k in footprint.keep.items()}  # check() refuses a missing layer
            return footprint.with_keep(keep, exact, novices)
        if self.budget == "layer" and not self.uniform:
            return footprint.with_keep({i: k - removed_count(k, self.ratio) for i, k in footprint.keep.items()}, exact, novices)
        remove, keep = removed_count(sum(footprint.keep.values()), self.ratio), dict(footprint.keep)
        for position, layer in enumerate(sorted(keep)):
            share = remove // len(keep) + (position < remove % len(keep))
            keep[layer] -= share
        return footprint.with_keep(keep, exact and len({footprint.sizes.layers[i].expert_bytes[footprint.bits[i]] for i in keep}) <= 1, novices)

    def run(self, context: StageContext) -> StageOutcome:
        result = prune(context.model, self.method, self.ratio, self.budget, context.batches, context.tokenizer, min_keep=self.min_keep,
                       options=dict(self.options), device=context.device, uniform=self.uniform, keep=self.keep)
        details = {"statistics_from_cache": result.summary["statistics_from_cache"]}
        if self.uniform:
            details["uniform"] = result.summary["uniform"]
        return StageOutcome(result.model, result.plan, details)
