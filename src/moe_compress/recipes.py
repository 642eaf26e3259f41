"""Recipes: several compression stages run in order on one model.

A recipe (YAML file or the same structure as a Python dict) names the model, one
calibration set shared by every stage, what to measure after each stage, and the stages:

    model: ref-deepseek
    calibration: {source: bundled, samples: 64, seq_len: 256, seed: 0}
    evaluate: {ppl: bundled, speed: false}     # windows / seq_len: the evaluation protocol's by default
    stages:
      - drop: {unit: block, n: 1}
      - prune: {method: reap, ratio: 0.25, budget: layer}
      - slim: {method: sparsegpt, nm: "2:4"}
      - quantize: {bits: 4}
    out: runs/deepseek-trim-prune-24-w4

`model` is required. `evaluate` measures perplexity with the evaluation protocol every command
uses (`evaluate.protocol.DEFAULT_PROTOCOL`: 128 windows of 256 tokens per source); `windows`
and `seq_len` override it. `trust_remote_code: true` lets a checkpoint that ships its own Python
code run it (as `--trust-remote-code` does for the other commands). Every field and stage
option is type-checked when the recipe is loaded -- stage options against the parameters of
the function the stage calls -- so a typo fails before any model is loaded. Then, before calibration, every stage's options are
checked against the model's structure (`preflight`): a drop of more layers than it has, a ratio
that leaves fewer experts than top-k, sparsifying shared experts it does not have, fine-tuning
with no condensed layer -- each fails in seconds, not after the stages before it ran.
`moe-compress run --dry-run` does all of that on the model's skeleton and prints the stages.

After every stage the quality guard (`evaluate.guard`) compares its output with its input on
held-out windows of the calibration text: a stage whose top-1 agreement falls below the
threshold (0.9 after quantize, 0.25 after the others) stops the run before anything is written.
`guard: {min_top1: 0.5, windows: 32}` sets it; `guard: false` turns it off.

`quantize` must be the last stage: it writes the packed compressed-tensors checkpoint that
becomes the recipe's output, and its report row measures that checkpoint as reloaded (what
users will run), not an in-memory approximation.

Each stage receives the previous stage's output model. Calibration batches are built once;
statistics are cached on disk per (model, data, statistics), so re-running a recipe, or a
recipe that shares a prefix with an earlier one, skips the calibration passes it already did.
One plan per structural stage is written to `<out>/plans/`, the final model to `<out>`, and
a report (quality, parameters, bytes and optionally tokens/s after every stage) to
`<out>/report.json` and `report.md`; all of it is assembled beside `<out>` and renamed into
place at the end. New stage kinds join with `stages.register_stage`; the same run is
`mc.compress(model, [stages...])` in Python (`pipeline`).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from .data.batches import CalibrationSpec, calibration_batches, check_seq_len
from .errors import MoECompressError
from .source.load import load_model
from .sink.output_lock import releases_outputs
from .sink.publish import validate_output_dir
from .sink.save import check_output_dir
from .pipeline import check_stages, guard_settings, eval_sources, protocol_of, run_stages
from .preflight import Structure
from .stages.base import Stage, describe_value, option_problem
from .stages.registry import build_stage, stages

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
_SECTIONS: dict[str, type[BaseModel]] = {
    "calibration": create_model("calibration", __config__=_STRICT, **{
        f.name: (get_type_hints(CalibrationSpec)[f.name], f.default) for f in fields(CalibrationSpec)
    }),
    "evaluate": create_model("evaluate", __config__=_STRICT, ppl=(str | list[str] | bool | None, "bundled"), windows=(int, 0),
                             seq_len=(int, 0), speed=(bool, False)),
}
_SECTIONS["guard"] = create_model("guard", __config__=_STRICT, min_top1=(float | None, None), windows=(int, 32))
_TOP_LEVEL = {"model", "calibration", "evaluate", "guard", "stages", "out", "device", "trust_remote_code"}


def _check_section(data: dict, key: str) -> None:
    """A section's fields: known names of the right types (each optional), positive counts."""
    section = data.get(key)
    if section is None:
        return
    if not isinstance(section, dict):
        raise MoECompressError(f"recipe field {key!r} must be a mapping; got {describe_value(section)}.")
    try:
        _SECTIONS[key](**section)
    except ValidationError as exc:
        raise MoECompressError(f"recipe field {key!r}: {option_problem(_SECTIONS[key], exc, section)}") from None
    for name in ("samples", "seq_len", "batch_size", "windows"):
        if isinstance(section.get(name), int) and section[name] < 1:
            raise MoECompressError(f"recipe field {key!r}: {name} must be a positive integer; got {section[name]}.")


def _read(recipe: str | Path | dict) -> dict:
    if isinstance(recipe, dict):
        return recipe
    path = Path(recipe)
    if path.is_dir():
        raise MoECompressError(f"recipe {path} is a directory; pass the recipe's YAML file (examples in recipes/).")
    if not path.is_file():
        raise MoECompressError(f"recipe {path} does not exist.")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MoECompressError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def recipe_stages(data: dict) -> list[Stage]:
    """The recipe's stages as stage objects (their options type-checked); a problem names its stage."""
    built = []
    known = stages()
    for position, stage in enumerate(data["stages"], 1):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise MoECompressError(f"stage {position} must be a mapping with one key, the stage kind, e.g. '- prune: {{ratio: 0.25}}'.")
        kind, options = next(iter(stage.items()))
        if kind not in known:
            raise MoECompressError(f"stage {position}: unknown kind {kind!r}; available: {', '.join(sorted(known))}.")
        if options is not None and not isinstance(options, dict):
            raise MoECompressError(f"stage {position} ({kind}): options must be a mapping.")
        if known[kind].final and position != len(data["stages"]):
            raise MoECompressError(f"stage {position} ({kind}) writes the final checkpoint, so it must be the last stage.")
        built.append(build_stage(kind, options, f"stage {position} ({kind})"))
    return built


def load_recipe(recipe: str | Path | dict) -> dict:
    """Read and type-check a recipe (see the module docstring); nothing is loaded or run."""
    data = _read(recipe)
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise MoECompressError("a recipe needs a non-empty 'stages' list (see `moe-compress run --help`).")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise MoECompressError(f"recipe has unknown top-level keys {sorted(unknown)}; known: {', '.join(sorted(_TOP_LEVEL))}.")
    for key, kind in (("out", str), ("device", str), ("trust_remote_code", bool)):
        if key in data and not isinstance(data[key], kind):
            raise MoECompressError(f"recipe field {key!r} must be a {kind.__name__}; got {describe_value(data[key])}.")
    _check_section(data, "calibration")
    _check_section(data, "evaluate")
    if not isinstance(data.get("guard", True), bool):
        _check_section(data, "guard")
    recipe_stages(data)
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise MoECompressError("a recipe needs 'model': a checkpoint directory, bundled model name or Hub id, e.g. 'model: ref-mixtral'.")
    return data


def _output_of(data: dict, out: str | Path | None) -> Path:
    return Path(out or data.get("out") or "runs/recipe")


def _inputs(recipe: str | Path | dict, data: dict) -> list[Any]:
    return [data["model"], *([recipe] if isinstance(recipe, str | Path) else [])]


def _sizes(model: str, composition: list[Stage], trust_remote_code: bool) -> list[str]:
    """What the dry run prints beside the stages: the weight bytes before them and after each, as predicted."""
    from .stages.footprint import footprints
    from .text.format import human_bytes

    chain = footprints(model, composition, trust_remote_code)
    if chain is None:
        return [""] * (len(composition) + 1)
    shown = [f" (the weights now: {human_bytes(chain[0].bytes)}, {chain[0].bytes:,} bytes)"]
    for footprint in chain[1:]:
        shown.append(f" -> weights {human_bytes(footprint.bytes)} ({footprint.bytes:,} bytes{'' if footprint.exact else ', estimated'})")
    return shown


def describe_recipe(recipe: str | Path | dict, out: str | Path | None = None, overwrite: bool = False) -> list[str]:
    """A dry run: check the recipe, the output and every stage against the model's skeleton (no
    weights read, nothing calibrated or written), and say what a run would do."""
    from .preflight import skeleton

    data = load_recipe(recipe)
    target = _output_of(data, out)
    calibration = CalibrationSpec(**(data.get("calibration") or {}))
    calibration.validate()
    validate_output_dir(target, overwrite, _inputs(recipe, data))
    structure = skeleton(data["model"], trust_remote_code=data.get("trust_remote_code", False))
    composition = recipe_stages(data)
    check_stages(composition, structure)
    evaluation = data.get("evaluate") or {}
    sources = eval_sources(evaluation)
    experts = sorted(set(structure.experts.values()))
    lines = [
        f"dry run: recipe {recipe if not isinstance(recipe, dict) else '(dict)'} on {data['model']} "
        f"({structure.adapter.model_type}, {len(structure.adapter.decoder_layers(structure.model))} layers, "
        f"{len(structure.experts)} MoE layers of {'/'.join(map(str, experts))} experts, top-{structure.top_k}) -> {target}",
        f"calibration, built once for every stage: {calibration.samples} sequences x {calibration.seq_len} tokens from "
        f"{calibration.source} (seed {calibration.seed})",
        f"measured before and after every stage: {', '.join(sources) or 'no perplexity'}"
        + (f"; {protocol_of(evaluation).describe()}" if sources else "") + ("; speed" if evaluation.get("speed") else ""),
    ]
    sizes = _sizes(data["model"], composition, data.get("trust_remote_code", False))
    lines.append("stages:" + sizes[0])
    lines += [f"  {position}. {stage.describe()}{sizes[position]}" for position, stage in enumerate(composition, 1)]
    lines.append("every stage was checked against the model's structure; nothing was calibrated or written.")
    return lines


@releases_outputs
def report_blocks(report: dict) -> list[str]:
    """What `moe-compress run` prints after `run_recipe`: every stage's measurements, then where the output was saved."""
    from .report.compression import saved_lines
    from .text.composition import stage_report_markdown

    return [stage_report_markdown(report).rstrip(), *saved_lines(Path(report["out"]))]


def run_recipe(recipe: str | Path | dict, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Run every stage in order; returns the report (also written under `out`)."""
    data = load_recipe(recipe)
    out = _output_of(data, out)
    calibration = CalibrationSpec(**(data.get("calibration") or {}))
    calibration.validate()
    check_output_dir(out, overwrite, _inputs(recipe, data))
    device = data.get("device", "cpu")
    model, tokenizer = load_model(data["model"], device=device, trust_remote_code=data.get("trust_remote_code", False))
    composition = recipe_stages(data)
    check_stages(composition, Structure.of(model, tokenizer))
    check_seq_len(calibration.seq_len, model.config, "calibration.seq_len")
    evaluation = data.get("evaluate") or {}
    batches = calibration_batches(tokenizer, calibration)
    guard = guard_settings(data.get("guard", True), tokenizer, calibration)
    return run_stages(model, tokenizer, composition, batches, out, overwrite, device, evaluation, record=data, guard=guard).report

