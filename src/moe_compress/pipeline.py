"""Several stages run in order on one model: what a recipe and `mc.compress(model, [stages])` both do.

The calibration batches are built once and shared by every stage (statistics are cached per
model and data, so a composition that shares a prefix with an earlier one skips the passes it
already did). Before anything is calibrated every stage checks itself against the input model's
structure; after every stage the model is measured (parameters, bytes, perplexity on the
evaluation protocol, optionally speed). The output -- the final model, one plan per structural
stage under `plans/`, `report.json` and `report.md` -- is assembled beside `out` and renamed
into place at the end.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch.registry import get_adapter
from .errors import MoECompressError, QualityGuardError
from .evaluate.guard import DEFAULT_BATCH_SIZE
from .evaluate.lm_perplexity import perplexity
from .evaluate.protocol import DEFAULT_PROTOCOL, EvalProtocol, expand_sources
from .arch.size import checkpoint_bytes, model_size
from .sink.model_card import write_model_card
from .sink.staging import discard_staging
from .sink.save import publish, save_compressed, staging_dir
from .plan import Plan
from .preflight import Structure
from .text.composition import stage_report_markdown
from .stages.base import Stage, StageContext

#: what the measurement after every stage is when nobody says (the protocol every command uses)
EVALUATE_DEFAULTS = {"ppl": "bundled", "windows": DEFAULT_PROTOCOL.windows, "seq_len": DEFAULT_PROTOCOL.seq_len, "speed": False}


@dataclass
class GuardSettings:
    """The quality guard after every stage (`evaluate.guard`): its output against its input on
    held-out windows; a stage below the threshold stops the composition before anything is written.
    `windows` None: not run, for the reason in `skipped` (recorded in the report)."""

    windows: torch.Tensor | None
    min_top1: float | None = None  # None: the guard's default for the stage's kind
    skipped: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE  # windows per forward: the calibration's batch size


def guard_settings(setting: bool | dict | None, tokenizer, calib: object) -> GuardSettings | None:
    """Held-out windows of the calibration text for the guard, as a recipe's `guard` (or
    `mc.compress(guard=...)`) says: true / a mapping {min_top1, windows}: run it; false: do not.
    Without held-out text (calibration given as token batches, or a text calibration uses whole)
    it is skipped, and the report says why."""
    from .data.batches import CalibrationSpec, held_out_windows
    from .evaluate.guard import DEFAULT_WINDOWS

    if setting is False:
        return None
    options = setting if isinstance(setting, dict) else {}
    if not isinstance(calib, CalibrationSpec):
        return GuardSettings(None, skipped="no held-out text: calibration was given as token batches")
    try:
        windows = held_out_windows(tokenizer, calib, options.get("windows", DEFAULT_WINDOWS))
    except MoECompressError as exc:
        return GuardSettings(None, skipped=str(exc))
    return GuardSettings(windows, options.get("min_top1"), batch_size=calib.batch_size)


def _guarded(guard: GuardSettings | None, stage: Stage, before: PreTrainedModel | None, after: PreTrainedModel, device: str) -> dict:
    """The guard's row entry for one stage; raises `QualityGuardError` when the stage failed it."""
    from .evaluate.guard import guard as check

    if guard is None:
        return {}
    if guard.windows is None:
        return {"guard": {"stage": stage.kind, "skipped": guard.skipped}}
    report = check(before, after, guard.windows, stage=stage.kind, min_top1=guard.min_top1, device=device, raise_on_failure=False,
                   batch_size=guard.batch_size)
    if not report.passed:
        raise QualityGuardError(report.failure(), report)
    return {"guard": report.to_dict()}


@dataclass
class Result:
    """What a composition produced: the final model (reloaded from the checkpoint when a final stage
    wrote one), the plans of its structural stages, its report, and where it was saved."""

    model: PreTrainedModel
    plans: list[tuple[str, Plan]] = field(default_factory=list)
    report: dict = field(default_factory=dict)
    output_dir: Path | None = None


def check_stages(stages: Sequence[Stage], structure: Structure) -> None:
    """The order (a final stage last) and every stage against the input model's structure; the first
    problem is raised, naming its stage. The checks see the input model, so they test what must hold
    whatever the earlier stages do."""
    if not stages:
        raise MoECompressError("give at least one stage, e.g. [mc.Prune('reap', ratio=0.25)].")
    for position, stage in enumerate(stages, 1):
        if stage.final and position != len(stages):
            raise MoECompressError(f"stage {position} ({stage.kind}) writes the final checkpoint, so it must be the last stage.")
    for position, stage in enumerate(stages, 1):
        try:
            stage.check(structure, list(stages[: position - 1]))
        except MoECompressError as exc:
            raise MoECompressError(f"stage {position} ({stage.kind}): {exc}") from None


def protocol_of(evaluation: dict) -> EvalProtocol:
    settings = {**EVALUATE_DEFAULTS, **evaluation}
    return EvalProtocol(settings["windows"], settings["seq_len"])


def eval_sources(evaluation: dict) -> list[str]:
    sources = {**EVALUATE_DEFAULTS, **evaluation}["ppl"]
    return expand_sources(sources) if sources else []


def eval_sets(tokenizer, evaluation: dict, config: object = None) -> dict[str, torch.Tensor]:
    protocol = protocol_of(evaluation)
    return {source: protocol.windows_of(tokenizer, source, config, "evaluate.seq_len") for source in eval_sources(evaluation)}


def _measure(model: PreTrainedModel, windows: dict[str, torch.Tensor], speed_prompts: torch.Tensor | None, stage: str = "") -> dict:
    size = model_size(model, get_adapter(model))
    row = {
        "params": size.total,
        "active_params": size.active_per_token,
        "bytes": size.bytes,
        "perplexity": {source: perplexity(model, data, description=f"perplexity {source} ({stage})").perplexity for source, data in windows.items()},
    }
    if speed_prompts is not None:
        from .evaluate.speed import measure_speed

        row["speed"] = measure_speed(model, speed_prompts).to_dict()
    return row


def run_stages(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    stages: Sequence[Stage],
    batches: list[torch.Tensor],
    out: Path | None,
    overwrite: bool = False,
    device: str = "cpu",
    evaluation: dict | None = None,
    record: dict[str, Any] | None = None,
    guard: GuardSettings | None = None,
) -> Result:
    """Run `stages` in order on `model` (checked by `check_stages` already); save to `out` if given.

    `record` is what the report says was asked for (the recipe). Without `out` nothing is written,
    which a final stage (one that writes the checkpoint) cannot do without. With `guard`, every
    stage's output is checked against its input (which costs a copy of the model while the stage
    runs) and a failure stops the run with nothing written."""
    evaluation = evaluation or {}
    measured_on = eval_sets(tokenizer, evaluation, model.config)
    speed_prompts = torch.cat(batches)[:4, :64] if evaluation.get("speed") else None
    rows = [{"stage": "original", **_measure(model, measured_on, speed_prompts, "original")}]
    plans: list[tuple[str, Plan]] = []
    if out is None and any(stage.final for stage in stages):
        raise MoECompressError("a quantize stage writes the output checkpoint: give an output directory (out=...).")
    work = staging_dir(out, "recipe") if out is not None else None
    try:
        checkpoint = None
        for position, stage in enumerate(stages, 1):
            start = time.perf_counter()
            scratch = work / f"stage-{position}" if work is not None else None
            before = copy.deepcopy(model) if guard is not None and guard.windows is not None else None
            outcome = stage.run(StageContext(model, tokenizer, batches, device, scratch))
            checked = _guarded(guard, stage, before, outcome.model, device)
            del before
            model, checkpoint = outcome.model, outcome.checkpoint
            if outcome.plan is not None:
                plans.append((f"{position:02d}-{stage.kind}", outcome.plan))
            # a stage's own facts (e.g. a quantised model's logical size) override the generic measurement
            rows.append({"stage": f"{position}: {stage.kind}", "options": stage.given(), "seconds": round(time.perf_counter() - start, 2),
                         **_measure(model, measured_on, speed_prompts, f"after stage {position}, {stage.kind}"), **outcome.info, **checked})
        protocol = protocol_of(evaluation).describe() if measured_on else None
        report = {"recipe": record or {}, "rows": rows, "protocol": protocol}
        if work is None:
            return Result(model, plans, report)
        saved = checkpoint or save_compressed(model, work / "checkpoint", tokenizer, plans[-1][1] if plans else None, overwrite=True)
        (saved / "plans").mkdir(exist_ok=True)
        for name, plan in plans:
            plan.save(saved / "plans" / f"{name}.json")
        report = {"recipe": record or {}, "rows": rows, "checkpoint_bytes": checkpoint_bytes(saved), "protocol": protocol}
        (saved / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (saved / "report.md").write_text(stage_report_markdown(report))
        write_model_card(saved)  # again, now with the report
        publish(saved, out, overwrite)
        report["out"] = str(out)
    finally:
        if work is not None:
            discard_staging(work)
    return Result(model, plans, report, out)
