"""Layer drop and block drop: remove the MoE sub-layers, or whole decoder blocks, that change the
residual stream least on calibration data (see `methods.structural`).

`drop` does it to one model; `Drop` is the same as a stage of a composition.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar, get_args

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import distributed
from ..data.batches import CalibrationSpec
from ..engine.finish import CompressionResult, apply_and_report, other_rank_result
from ..engine.identity import model_identity
from ..engine.prepare import Calibration, calibration_batches, prepare
from ..errors import MoECompressError, param
from ..arch.size import model_size
from ..finite import require_finite_numbers
from ..source.open import Streaming
from ..sink.output_lock import releases_outputs
from ..source.residency import Weights
from ..methods.structural import ConsecutiveScore, Mode, Unit, distance_needed, plan_block_drop, plan_drop, plan_moe_drop
from ..walk.similarity import observe_similarities
from ..preflight import Structure, check_drop
from .options import DropOptions
from .base import Job, Stage, StageContext, StageOutcome
from .footprint import Footprint
from .registry import register_stage

UNITS = get_args(Unit)
MODES = get_args(Mode)


@releases_outputs
def drop(
    model: PreTrainedModel | Weights | str | Path,
    unit: Unit = "moe",
    n: int | None = None,
    target_ratio: float | None = None,
    layers: list[int] | str | None = None,
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
    `methods.structural`); give `n` units or a `target_ratio` of parameters to remove, or the `layers`
    whose MoE sub-layers (or, unit="block", whole blocks) go -- nothing is then calibrated (what `fit` chose, replayed).
    `consecutive_score="framework"` scores a consecutive run of n blocks as the unified
    framework's code does, by cos(h_i, h_{i+n+1}).
    """
    start = time.perf_counter()
    if unit not in UNITS:
        raise MoECompressError(f"unit must be one of {', '.join(UNITS)} (MoE sub-layers or whole blocks); got {unit!r}.")
    if mode not in MODES:
        raise MoECompressError(f"mode must be one of {', '.join(MODES)}; got {mode!r}.")
    require_finite_numbers([("target_ratio", target_ratio)])
    chosen = moe_layers(layers, unit, n, target_ratio)
    model, tokenizer, adapter, weights = prepare(model, tokenizer, out, overwrite, device, streaming, dtype, trust_remote_code)
    before = model_size(model, adapter)
    if unit == "moe":
        adapter.require_separate_moe()
    identity = model_identity(model, adapter, weights)
    if chosen is not None:
        if not distributed.is_main():
            return other_rank_result()
        plan = plan_moe_drop(model, adapter, chosen) if unit == "moe" else plan_block_drop(model, adapter, chosen)
        plan.identity = identity
        return apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, False, weights)
    batches = calibration_batches(calib, tokenizer, model.config)
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
        return other_rank_result()
    plan = plan_drop(model, adapter, scores, unit, n, target_ratio, mode, consecutive_score)
    plan.identity = identity
    return apply_and_report(model, adapter, plan, tokenizer, out, overwrite, start, before, False, weights)


def original_indices(layers: list[int], gone: list[int]) -> list[int]:
    """`layers`, numbered as in the model without the blocks `gone` (the original's indices), as the original numbers them."""
    alive = [i for i in range(max(layers, default=0) + len(gone) + 1) if i not in gone]
    return [alive[i] for i in layers]


def dropped_blocks(stages) -> list[int]:
    """The decoder blocks, by the input's indices, that `stages` drop by name (each stage's indices are its own input's:
    an earlier block drop renumbered them): what renumbers the layers of the stages after them."""
    found: list[int] = []
    for stage in stages:
        if isinstance(stage, Drop) and stage.unit == "block" and stage.layers is not None:
            found = sorted({*found, *original_indices(moe_layers(stage.layers, stage.unit, None, None), found)})
    return found


def moe_layers(layers: list[int] | str | None, unit: str, n: int | None, target_ratio: float | None) -> list[int] | None:
    """`layers` as a sorted list of decoder indices (a command line writes them comma-separated); None where not given."""
    if layers is None:
        return None
    if n is not None or target_ratio is not None:
        raise MoECompressError(f"{param('layers')} names the MoE sub-layers (or, {param('unit')} block, the blocks) to drop: give it without {param('n')} or {param('target_ratio')}.")
    try:
        chosen = [int(part) for part in layers.split(",")] if isinstance(layers, str) else [int(layer) for layer in layers]
    except ValueError:
        raise MoECompressError(f"{param('layers')} takes decoder layer indices, comma-separated (e.g. 3,5); got {layers!r}.") from None
    if not chosen or len(set(chosen)) != len(chosen):
        raise MoECompressError(f"{param('layers')} must name at least one {'MoE layer' if unit == 'moe' else 'block'}, each once; got {layers!r}.")
    return sorted(chosen)


@register_stage
class Drop(DropOptions, Stage):
    """Layer drop (unit="moe": MoE sub-layers) or block drop (unit="block": whole decoder layers)."""

    kind: ClassVar[str] = "drop"
    streams: ClassVar[bool] = True

    @classmethod
    def check_options(cls, options: dict[str, Any], planned: bool = False) -> None:
        unit, mode = options["unit"], options["mode"]
        if unit not in UNITS or mode not in MODES:
            raise MoECompressError(f"{param('unit')} must be one of {', '.join(UNITS)} and {param('mode')} one of {', '.join(MODES)}; got {param('unit')} {unit} {param('mode')} {mode}.")
        moe_layers(options.get("layers"), unit, options.get("n"), options.get("target_ratio"))

    def run_one(self, model: Any, tokenizer: Any, job: Job) -> CompressionResult:
        return drop(model, **self.settings(), calib=job.calib, tokenizer=tokenizer, out=job.out, overwrite=job.overwrite, device=job.device)

    def check(self, structure: Structure, earlier) -> None:
        """Against the input model, the `layers` as the original numbers them (earlier block drops renumber them)."""
        chosen = moe_layers(self.layers, self.unit, self.n, self.target_ratio)
        check_drop(structure, self.unit, self.n, self.target_ratio, chosen and original_indices(chosen, dropped_blocks(earlier)))

    def calibrates(self) -> str | None:
        return "score how little each unit changes the residual stream" if self.layers is None else None

    def explain(self, structure: Structure) -> list[str]:
        what = "MoE sub-layers (attention stays)" if self.unit == "moe" else f"decoder blocks ({self.mode})"
        if self.layers is not None:
            what = what if self.unit == "moe" else "decoder blocks"
            return [f"would drop the {what} of layers {', '.join(map(str, moe_layers(self.layers, self.unit, self.n, self.target_ratio)))}"]
        return [f"would drop {self.n} {what}" if self.n is not None else f"would drop enough {what} to remove {self.target_ratio:.0%} of the parameters"]

    def predict(self, footprint: Footprint) -> Footprint:
        """`n` units, the last ones (which ones is decided by calibration); the `layers` named (by the input's indices), exactly;
        a target ratio is not predicted."""
        if self.layers is not None:
            chosen = moe_layers(self.layers, self.unit, self.n, self.target_ratio)
            if self.unit == "block":
                return footprint.without_block_layers(chosen)
            return footprint.without_moe_layers([footprint.original_layer(i) for i in chosen] if footprint.dropped_blocks else chosen)
        if self.n is None:
            return footprint.with_keep(footprint.keep, exact=False)
        return footprint.without_moe(self.n) if self.unit == "moe" else footprint.without_blocks(self.n)

    def run(self, context: StageContext) -> StageOutcome:
        result = drop(context.model, calib=context.batches, tokenizer=context.tokenizer, device=context.device, **self.settings())
        return StageOutcome(result.model, result.plan)
