"""The Python API: one call that runs any composition of stages, the same code the CLI and recipes use.

    import moe_compress as mc
    result = mc.compress("ref-mixtral", [mc.Prune("reap", ratio=0.25), mc.Slim("wanda", sparsity=0.5), mc.Quantize(bits=4)],
                         out="small/")
    print(result.report["rows"][-1])

`compress(model, method, ratio, ...)` -- a single prune, as earlier releases spelled it -- still
works for this release and is `stages.prune.prune`; so are the other single-stage calls
(`mc.drop`, `mc.condense`, `mc.slim`, `mc.quantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .data.batches import CalibrationSpec
from .engine.finish import CompressionResult
from .engine.prepare import Calibration, calibration_batches, source_of
from .finite import require_finite_weights
from .source.load import check_device, load_model
from .sink.output_lock import releases_outputs
from .sink.save import check_output_dir
from .pipeline import Result, check_stages, guard_settings, run_stages
from .preflight import Structure
from .stages.base import Stage
from .stages.prune import prune


def _record(model: Any, stages: Sequence[Stage], calib: Calibration) -> dict:
    """What the report says was asked for, in a recipe's words (a model in memory has no name to give)."""
    return {
        "model": str(model) if isinstance(model, str | Path) else "(in memory)",
        "calibration": calib.__dict__ if isinstance(calib, CalibrationSpec) else str(calib) if isinstance(calib, str) else "(token batches)",
        "stages": [{stage.kind: stage.given()} for stage in stages],
    }


@releases_outputs
def _compose(
    model: PreTrainedModel | str | Path,
    stages: Sequence[Stage],
    calib: Calibration = CalibrationSpec(samples=128),
    tokenizer: PreTrainedTokenizerBase | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    evaluate: dict | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
    guard: bool | dict = True,
) -> Result:
    check_device(device)
    stages = list(stages)
    if out is not None:
        check_output_dir(out, overwrite, [source_of(model)])
    if isinstance(model, PreTrainedModel):
        require_finite_weights(model)
    else:
        model, loaded = load_model(model, device=device, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or loaded
    check_stages(stages, Structure.of(model, tokenizer))
    batches = calibration_batches(calib, tokenizer, model.config)
    return run_stages(model, tokenizer, stages, batches, Path(out) if out is not None else None, overwrite, device,
                      evaluate or {"ppl": False}, record=_record(model, stages, calib), guard=guard_settings(guard, tokenizer, calib))


def compress(model: PreTrainedModel | str | Path, stages: Sequence[Stage] | str | None = None, *args: Any, **kwargs: Any) -> Result | CompressionResult:
    """Run `stages` (e.g. `[mc.Prune("reap", ratio=0.25), mc.Quantize(bits=4)]`) in order on `model`.

    Keywords: `calib` (a CalibrationSpec, a text source, or [batch, seq] token tensors; built once,
    shared by every stage), `tokenizer`, `out` (written atomically: the final model, a plan per
    structural stage under `plans/`, `report.json`, `report.md`, a model card), `overwrite`,
    `evaluate` (what to measure after every stage, as a recipe's `evaluate` section; default: sizes
    only, `{"ppl": "bundled"}` adds the protocol's perplexity), `device`, `trust_remote_code`,
    `guard` (after every stage, its output against its input on held-out calibration text: a stage
    whose top-1 agreement falls below the threshold stops the run with nothing written; a mapping
    {"min_top1": ..., "windows": ...} sets it, False turns it off; see `evaluate.guard`).
    Every stage is checked against the model's structure before anything is calibrated. A model
    given by name is loaded in memory; a final stage (quantize) needs `out`. Returns one `Result`.

    Called with a method name instead of stages (`compress(model, "reap", 0.25, ...)`), it is
    the single prune of earlier releases (`stages.prune.prune`, returning a CompressionResult).
    """
    if isinstance(stages, list | tuple) and all(isinstance(stage, Stage) for stage in stages):
        return _compose(model, stages, *args, **kwargs)
    return prune(model, *((stages,) if stages is not None else ()), *args, **kwargs)
