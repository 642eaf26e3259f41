"""CD-MoE: condense MoE layers into their shared experts plus a few constant-weight routed experts.

`condense` does it to one model (in memory: its search reruns every later layer); `Condense`
is the same as a stage of a composition.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.batches import CalibrationSpec, batches_fingerprint
from ..engine.finish import CompressionResult, apply_and_report
from ..engine.identity import model_identity
from ..engine.prepare import Calibration, calibration_batches, prepare
from ..engine.statistics import collect_statistics
from ..arch.size import model_size
from ..source.load import resolve_model
from ..source import open as opening  # `opening.available_bytes` at call time: what the machine has now
from ..sink.output_lock import releases_outputs
from ..source.residency import InMemoryWeights
from ..methods.condense import plan_condense
from ..methods.condense_state import SearchState, default_state_path, state_key
from ..errors import MoECompressError, param
from ..preflight import Structure, check_condense, check_condense_memory, skeleton
from .options import CondenseOptions
from .base import Job, Stage, StageContext, StageOutcome, load_whole
from .footprint import Footprint
from .registry import register_stage


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
        check_condense_memory(Path(resolve_model(model)), calib.samples, calib.seq_len, opening.available_bytes("cpu"))
    model, tokenizer, adapter, weights = prepare(model, tokenizer, out, overwrite, device, trust_remote_code=trust_remote_code)
    check_condense(Structure(model, adapter), layers, experts)  # before calibrating
    before = model_size(model, adapter)
    identity = model_identity(model, adapter, weights)
    batches = calibration_batches(calib, tokenizer, model.config)
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
    return apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, from_cache, InMemoryWeights(model))


@register_stage
class Condense(CondenseOptions, Stage):
    """CD-MoE: condense `layers` MoE layers into shared experts + `experts` constant-weight experts each."""

    kind: ClassVar[str] = "condense"
    positive: ClassVar[tuple[str, ...]] = ("layers", "position_stride")

    @classmethod
    def check_options(cls, options: dict[str, Any], planned: bool = False) -> None:
        if options["experts"] is not None and options["experts"] < 0:
            raise MoECompressError(f"{param('experts')} must be 0 (shared experts only) or more; got {options['experts']}.")

    def before_loading(self, model: str, job: Job) -> None:
        """From the config and shard headers (no weight read yet); then its memory: it holds every layer's input."""
        self.check(skeleton(model, job.dtype, job.trust_remote_code), [])
        if Path(resolve_model(model)).is_dir():
            check_condense_memory(Path(resolve_model(model)), job.calib.samples, job.calib.seq_len, opening.available_bytes("cpu"))

    def run_one(self, model: str, tokenizer: Any, job: Job) -> CompressionResult:
        """In memory: its search reruns every later layer."""
        loaded, tokenizer = load_whole(model, job)
        return condense(loaded, **self.settings(), calib=job.calib, tokenizer=tokenizer, out=job.out, overwrite=job.overwrite, device=job.device)

    def check(self, structure: Structure, earlier) -> None:
        check_condense(structure, self.layers, self.experts)

    def calibrates(self) -> str:
        return "search, per MoE layer, the experts whose constant-weight sum keeps its output closest (CD-MoE)"

    def explain(self, structure: Structure) -> list[str]:
        size = self.experts if self.experts is not None else structure.top_k
        return [f"would condense {self.layers} of {len(structure.experts)} MoE layers, each keeping "
                f"{'at most' if self.choose_size else 'exactly'} {size} routed experts"]

    def predict(self, footprint: Footprint) -> Footprint:
        """`layers` layers keep K experts (the top-k by default) and lose their router's rows: an estimate of which layers."""
        chosen = sorted(footprint.keep)[-self.layers:]
        keep = {i: min(k, self.experts if self.experts is not None else k) if i in chosen else k for i, k in footprint.keep.items()}
        return footprint.with_keep(keep, exact=False)

    def run(self, context: StageContext) -> StageOutcome:
        result = condense(context.model, calib=context.batches, tokenizer=context.tokenizer, device=context.device, **self.settings())
        return StageOutcome(result.model, result.plan, {k: result.plan.meta[k] for k in ("evaluations", "search_seconds")})
