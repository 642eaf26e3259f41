"""Recipes: several compression stages run in order on one model.

A recipe (YAML file or the same structure as a Python dict) names the model, one
calibration set shared by every stage, what to measure after each stage, and the stages:

    model: ref-deepseek
    calibration: {source: bundled, samples: 64, seq_len: 256, seed: 0}
    evaluate: {ppl: bundled, windows: 24, speed: false}
    stages:
      - drop: {unit: block, n: 1}
      - prune: {method: reap, ratio: 0.25, budget: layer}
      - slim: {method: sparsegpt, nm: "2:4"}
      - quantize: {bits: 4}
    out: runs/deepseek-trim-prune-24-w4

`quantize` must be the last stage: it writes the packed compressed-tensors checkpoint that
becomes the recipe's output, and its report row measures that checkpoint as reloaded (what
users will run), not an in-memory approximation.

Each stage receives the previous stage's output model. Calibration batches are built once;
statistics are cached on disk per (model, data, statistics), so re-running a recipe, or a
recipe that shares a prefix with an earlier one, skips the calibration passes it already did.
One plan per structural stage is written to `<out>/plans/`, the final model to `<out>`, and
a report (quality, parameters, bytes and optionally tokens/s after every stage) to
`<out>/report.json` and `report.md`; all of it is assembled beside `<out>` and renamed into
place at the end. New stage kinds join with `register_stage`.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch.registry import get_adapter
from .data.batches import CalibrationSpec, calibration_batches, token_stream, windows
from .data.texts import bundled_domains, load_texts
from .errors import MoECompressError
from .evaluate.perplexity import perplexity
from .evaluate.size import checkpoint_bytes, model_size
from .io.load import load_model
from .io.save import check_output_dir, publish, save_compressed
from .plan import Plan


@dataclass
class StageContext:
    """What a stage may use: the current model, its tokenizer and the shared calibration batches."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    batches: list[torch.Tensor]
    device: str = "cpu"
    scratch: Path | None = None  # a private directory for stages that write checkpoints


@dataclass
class StageOutcome:
    model: PreTrainedModel
    plan: Plan | None = None
    info: dict = field(default_factory=dict)
    checkpoint: Path | None = None  # set by a final stage that already wrote the output checkpoint


StageFunction = Callable[[StageContext, dict[str, Any]], StageOutcome]
STAGES: dict[str, StageFunction] = {}
FINAL_STAGES: set[str] = set()  # kinds that can only be the last stage


def register_stage(name: str, function: StageFunction, final: bool = False) -> None:
    STAGES[name] = function
    if final:
        FINAL_STAGES.add(name)


def _prune(ctx: StageContext, options: dict) -> StageOutcome:
    from .api import compress

    options = dict(options)
    method, ratio, budget = options.pop("method", "reap"), options.pop("ratio", 0.25), options.pop("budget", "layer")
    min_keep = options.pop("min_keep", 0)
    result = compress(ctx.model, method, ratio, budget, ctx.batches, ctx.tokenizer, min_keep=min_keep, options=options, device=ctx.device)
    return StageOutcome(result.model, result.plan, {"statistics_from_cache": result.summary["statistics_from_cache"]})


def _drop(ctx: StageContext, options: dict) -> StageOutcome:
    from .api import drop

    result = drop(ctx.model, calib=ctx.batches, tokenizer=ctx.tokenizer, device=ctx.device, **options)
    return StageOutcome(result.model, result.plan)


def _condense(ctx: StageContext, options: dict) -> StageOutcome:
    from .api import condense

    result = condense(ctx.model, calib=ctx.batches, tokenizer=ctx.tokenizer, device=ctx.device, **options)
    return StageOutcome(result.model, result.plan, {k: result.plan.meta[k] for k in ("evaluations", "search_seconds")})


def _finetune(ctx: StageContext, options: dict) -> StageOutcome:
    from .finetune import finetune

    report = finetune(ctx.model, ctx.tokenizer, device=ctx.device, **options)
    return StageOutcome(ctx.model, None, report)


for _name, _function in (("prune", _prune), ("drop", _drop), ("condense", _condense), ("finetune", _finetune)):
    register_stage(_name, _function)


def load_recipe(recipe: str | Path | dict) -> dict:
    if isinstance(recipe, dict):
        data = recipe
    else:
        path = Path(recipe)
        if not path.is_file():
            raise MoECompressError(f"recipe {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise MoECompressError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise MoECompressError("a recipe needs a non-empty 'stages' list (see `moe-compress run --help`).")
    for position, stage in enumerate(data["stages"], 1):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise MoECompressError(f"stage {position} must be a mapping with one key, the stage kind, e.g. '- prune: {{ratio: 0.25}}'.")
        kind, options = next(iter(stage.items()))
        if kind not in STAGES:
            raise MoECompressError(f"stage {position}: unknown kind {kind!r}; available: {', '.join(sorted(STAGES))}.")
        if options is not None and not isinstance(options, dict):
            raise MoECompressError(f"stage {position} ({kind}): options must be a mapping.")
        if kind in FINAL_STAGES and position != len(data["stages"]):
            raise MoECompressError(f"stage {position} ({kind}) writes the final checkpoint, so it must be the last stage.")
    unknown = set(data) - {"model", "calibration", "evaluate", "stages", "out", "device"}
    if unknown:
        raise MoECompressError(f"recipe has unknown top-level keys {sorted(unknown)}.")
    return data


def _eval_sets(tokenizer, spec: dict) -> dict[str, torch.Tensor]:
    sources = spec.get("ppl", "bundled")
    sources = [sources] if isinstance(sources, str) else list(sources)
    expanded = [one for s in sources for one in ([f"bundled:{d}" for d in bundled_domains()] if s == "bundled" else [s])]
    seq_len, count = int(spec.get("seq_len", 256)), int(spec.get("windows", 24))
    return {source: windows(token_stream(tokenizer, load_texts(source, split="test")), seq_len)[:count] for source in expanded}


def _measure(model: PreTrainedModel, eval_sets: dict[str, torch.Tensor], speed_prompts: torch.Tensor | None) -> dict:
    adapter = get_adapter(model)
    size = model_size(model, adapter)
    row = {
        "params": size.total,
        "active_params": size.active_per_token,
        "bytes": size.bytes,
        "perplexity": {source: perplexity(model, data).perplexity for source, data in eval_sets.items()},
    }
    if speed_prompts is not None:
        from .evaluate.speed import measure_speed

        row["speed"] = measure_speed(model, speed_prompts).to_dict()
    return row


def run_recipe(recipe: str | Path | dict, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Run every stage in order; returns the report (also written under `out`)."""
    data = load_recipe(recipe)
    out = Path(out or data.get("out") or "runs/recipe")
    check_output_dir(out, overwrite)
    device = data.get("device", "cpu")
    model, tokenizer = load_model(data.get("model", "ref-mixtral"), device=device)
    calibration = CalibrationSpec(**(data.get("calibration") or {}))
    batches = calibration_batches(tokenizer, calibration)
    evaluation = data.get("evaluate") or {}
    eval_sets = _eval_sets(tokenizer, evaluation) if evaluation.get("ppl", "bundled") else {}
    speed_prompts = None
    if evaluation.get("speed"):
        speed_prompts = torch.cat(batches)[:4, :64]
    rows = [{"stage": "original", **_measure(model, eval_sets, speed_prompts)}]
    plans: list[tuple[str, Plan]] = []
    work = out.parent / f".{out.name}.recipe-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        checkpoint = None
        for position, stage in enumerate(data["stages"], 1):
            kind, options = next(iter(stage.items()))
            start = time.perf_counter()
            outcome = STAGES[kind](StageContext(model, tokenizer, batches, device, work / f"stage-{position}"), dict(options or {}))
            model, checkpoint = outcome.model, outcome.checkpoint
            if outcome.plan is not None:
                plans.append((f"{position:02d}-{kind}", outcome.plan))
            # a stage's own facts (e.g. a quantised model's logical size) override the generic measurement
            rows.append({"stage": f"{position}: {kind}", "options": options or {}, "seconds": round(time.perf_counter() - start, 2),
                         **_measure(model, eval_sets, speed_prompts), **outcome.info})
        saved = checkpoint or save_compressed(model, work / "checkpoint", tokenizer, plans[-1][1] if plans else None, overwrite=True)
        (saved / "plans").mkdir(exist_ok=True)
        for name, plan in plans:
            plan.save(saved / "plans" / f"{name}.json")
        report = {"recipe": data, "rows": rows, "checkpoint_bytes": checkpoint_bytes(saved)}
        (saved / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (saved / "report.md").write_text(report_markdown(report))
        publish(saved, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def report_markdown(report: dict) -> str:
    sources = list(report["rows"][0]["perplexity"])
    header = ["stage", "params", "bytes (MiB)", *[f"ppl {s}" for s in sources]]
    has_speed = "speed" in report["rows"][0]
    if has_speed:
        header += ["prefill tok/s", "decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["stage"], f"{row['params']:,}", f"{row['bytes'] / 2**20:.2f}", *[f"{row['perplexity'][s]:.3f}" for s in sources]]
        if has_speed:
            cells += [f"{row['speed']['prefill_tokens_per_s']:.0f}", f"{row['speed']['decode_tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nCheckpoint: {report['checkpoint_bytes'] / 2**20:.2f} MiB.\n"
