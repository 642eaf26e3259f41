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

import inspect
import json
import math
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch.registry import get_adapter
from .data.batches import CalibrationSpec, calibration_batches, check_seq_len
from .errors import MoECompressError
from .evaluate.lm_perplexity import perplexity
from .evaluate.protocol import DEFAULT_PROTOCOL, EvalProtocol, expand_sources
from .evaluate.size import checkpoint_bytes, model_size
from .io.load import load_model
from .io.model_card import write_model_card
from .io.output_lock import releases_outputs
from .io.publish import validate_output_dir
from .io.staging import discard_staging
from .io.save import check_output_dir, publish, save_compressed, staging_dir
from .plan import Plan
from .preflight import Structure, check_condense, check_drop, check_finetune, check_prune, check_slim


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
#: kind -> returns the function whose keyword parameters the stage's options are (for type checks)
STAGE_OPTIONS: dict[str, Callable[[], Callable]] = {}
#: parameters a stage fills from the recipe itself, never from its options
_SET_BY_RECIPE = {"model", "calib", "tokenizer", "device", "out", "overwrite", "trust_remote_code", "plan", "options", "checkpoint_every",
                  "streaming", "dtype"}


def register_stage(name: str, function: StageFunction, final: bool = False, accepts: Callable[[], Callable] | None = None) -> None:
    """Add a stage kind. `accepts()` returns the function its options are passed to (imported
    lazily), so that `load_recipe` checks their names and types before anything runs. A name
    already taken is an error: a recipe naming it would silently run another stage."""
    if name in STAGES:
        raise ValueError(f"a stage named {name!r} is already registered; choose another name.")
    STAGES[name] = function
    if final:
        FINAL_STAGES.add(name)
    if accepts is not None:
        STAGE_OPTIONS[name] = accepts


#: The prune stage's own settings; every other option is the method's.
_PRUNE_SETTINGS = ("method", "ratio", "budget", "min_keep", "uniform")


def _prune(ctx: StageContext, options: dict) -> StageOutcome:
    from .api import compress

    options = dict(options)
    method, ratio, budget = options.pop("method", "reap"), options.pop("ratio", 0.25), options.pop("budget", "layer")
    min_keep, uniform = options.pop("min_keep", 0), options.pop("uniform", False)
    result = compress(ctx.model, method, ratio, budget, ctx.batches, ctx.tokenizer, min_keep=min_keep, options=options, device=ctx.device, uniform=uniform)
    details = {"statistics_from_cache": result.summary["statistics_from_cache"]}
    if uniform:
        details["uniform"] = result.summary["uniform"]
    return StageOutcome(result.model, result.plan, details)


def _drop(ctx: StageContext, options: dict) -> StageOutcome:
    from .api import drop

    result = drop(ctx.model, calib=ctx.batches, tokenizer=ctx.tokenizer, device=ctx.device, **options)
    return StageOutcome(result.model, result.plan)


def _condense(ctx: StageContext, options: dict) -> StageOutcome:
    from .api import condense

    result = condense(ctx.model, calib=ctx.batches, tokenizer=ctx.tokenizer, device=ctx.device, **options)
    return StageOutcome(result.model, result.plan, {k: result.plan.meta[k] for k in ("evaluations", "search_seconds")})


def _finetune(ctx: StageContext, options: dict) -> StageOutcome:
    from .finetuning import finetune

    report = finetune(ctx.model, ctx.tokenizer, device=ctx.device, **options)
    return StageOutcome(ctx.model, None, report)


def _prune_options() -> Callable:
    from .api import compress

    return compress


def _drop_options() -> Callable:
    from .api import drop

    return drop


def _condense_options() -> Callable:
    from .api import condense

    return condense


def _finetune_options() -> Callable:
    from .finetuning import finetune

    return finetune


for _name, _function, _accepts in (
    ("prune", _prune, _prune_options), ("drop", _drop, _drop_options),
    ("condense", _condense, _condense_options), ("finetune", _finetune, _finetune_options),
):
    register_stage(_name, _function, accepts=_accepts)


# ---- type checks -------------------------------------------------------------------------
def _fits(value: Any, annotation: Any) -> bool:
    """Whether a YAML value can stand for a parameter of this annotation (paths are strings)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        element = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_fits(v, element) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if annotation in (str, Path):
        return isinstance(value, str)
    return False  # models, tokenizers, tensors: nothing a recipe can give


def _describe(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _check_options(where: str, options: dict, hints: dict[str, Any], known: list[str]) -> None:
    for name, value in options.items():
        if name not in known:
            raise MoECompressError(f"{where}: unknown option {name!r}; known: {', '.join(sorted(known))}.")
        if not _fits(value, hints.get(name, Any)):
            raise MoECompressError(f"{where}: option {name!r} must be {_type_name(hints[name])}; got {_describe(value)}.")


_NAMES = {int: "an integer", float: "a finite number", str: "a string", Path: "a string", bool: "true or false", type(None): "null"}


def _type_name(annotation: Any) -> str:
    """What a value of this annotation is, in words a recipe author reads."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_type_name(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        return f"a list of {_type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _check_stage(position: int, kind: str, options: dict) -> None:
    """Stage options: known names, and values of the types the stage's function takes."""
    accepts = STAGE_OPTIONS.get(kind)
    where = f"stage {position} ({kind})"
    if accepts is None:
        return
    function = accepts()
    hints = typing.get_type_hints(function)
    known = [p for p in inspect.signature(function).parameters if p not in _SET_BY_RECIPE]
    if kind == "prune":  # the method's own options ride along; their defaults give their types
        from .methods import get_method

        method = options.get("method", "reap")
        if not isinstance(method, str):
            raise MoECompressError(f"{where}: option 'method' must be a string; got {_describe(method)}.")
        defaults = get_method(method).resolved_options({})  # its options and the guard every method takes
        hints = {**hints, **{k: Any if v is None else float if isinstance(v, float) else type(v) for k, v in defaults.items()}}
        known = [*_PRUNE_SETTINGS, *defaults]
    _check_options(where, options, hints, known)


def stage_options(kind: str) -> dict[str, Any]:
    """A stage kind's options and their defaults (what a recipe may set; `moe-compress methods` lists them)."""
    accepts = STAGE_OPTIONS.get(kind)
    if accepts is None:
        return {}
    parameters = inspect.signature(accepts()).parameters
    return {name: p.default for name, p in parameters.items() if name not in _SET_BY_RECIPE and p.default is not inspect.Parameter.empty}


def _builtin_stages() -> None:
    """Register the stages defined outside this module (`slim`, `quantize`): importing
    `moe_compress` no longer imports everything, so a recipe must not depend on that."""
    from .slimming import stages  # noqa: F401  (registration)


_CALIBRATION = typing.get_type_hints(CalibrationSpec)
_EVALUATE = {"ppl": str | list[str] | bool | None, "windows": int, "seq_len": int, "speed": bool}
#: what `evaluate` means when a recipe does not say (the evaluation protocol every command uses)
EVALUATE_DEFAULTS = {"ppl": "bundled", "windows": DEFAULT_PROTOCOL.windows, "seq_len": DEFAULT_PROTOCOL.seq_len, "speed": False}
_TOP_LEVEL = {"model", "calibration", "evaluate", "stages", "out", "device", "trust_remote_code"}


def _check_section(data: dict, key: str, hints: dict[str, Any]) -> None:
    section = data.get(key)
    if section is None:
        return
    if not isinstance(section, dict):
        raise MoECompressError(f"recipe field {key!r} must be a mapping; got {_describe(section)}.")
    _check_options(f"recipe field {key!r}", section, hints, list(hints))
    for name in ("samples", "seq_len", "batch_size", "windows"):
        if isinstance(section.get(name), int) and section[name] < 1:
            raise MoECompressError(f"recipe field {key!r}: {name} must be a positive integer; got {section[name]}.")


def load_recipe(recipe: str | Path | dict) -> dict:
    """Read and type-check a recipe (see the module docstring); nothing is loaded or run."""
    _builtin_stages()
    if isinstance(recipe, dict):
        data = recipe
    else:
        path = Path(recipe)
        if path.is_dir():
            raise MoECompressError(f"recipe {path} is a directory; pass the recipe's YAML file (examples in recipes/).")
        if not path.is_file():
            raise MoECompressError(f"recipe {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise MoECompressError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise MoECompressError("a recipe needs a non-empty 'stages' list (see `moe-compress run --help`).")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise MoECompressError(f"recipe has unknown top-level keys {sorted(unknown)}; known: {', '.join(sorted(_TOP_LEVEL))}.")
    for key, kind in (("out", str), ("device", str), ("trust_remote_code", bool)):
        if key in data and not isinstance(data[key], kind):
            raise MoECompressError(f"recipe field {key!r} must be a {kind.__name__}; got {_describe(data[key])}.")
    _check_section(data, "calibration", _CALIBRATION)
    _check_section(data, "evaluate", _EVALUATE)
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
        _check_stage(position, kind, options or {})
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise MoECompressError("a recipe needs 'model': a checkpoint directory, bundled model name or Hub id, e.g. 'model: ref-mixtral'.")
    return data


def _protocol(evaluation: dict) -> EvalProtocol:
    settings = {**EVALUATE_DEFAULTS, **evaluation}
    return EvalProtocol(settings["windows"], settings["seq_len"])


def _eval_sources(evaluation: dict) -> list[str]:
    sources = {**EVALUATE_DEFAULTS, **evaluation}["ppl"]
    return expand_sources(sources) if sources else []


def _eval_sets(tokenizer, evaluation: dict, config: object = None) -> dict[str, torch.Tensor]:
    protocol = _protocol(evaluation)
    return {source: protocol.windows_of(tokenizer, source, config, "evaluate.seq_len") for source in _eval_sources(evaluation)}


def _measure(model: PreTrainedModel, eval_sets: dict[str, torch.Tensor], speed_prompts: torch.Tensor | None, stage: str = "") -> dict:
    adapter = get_adapter(model)
    size = model_size(model, adapter)
    row = {
        "params": size.total,
        "active_params": size.active_per_token,
        "bytes": size.bytes,
        "perplexity": {source: perplexity(model, data, description=f"perplexity {source} ({stage})").perplexity for source, data in eval_sets.items()},
    }
    if speed_prompts is not None:
        from .evaluate.speed import measure_speed

        row["speed"] = measure_speed(model, speed_prompts).to_dict()
    return row


# ---- checks against the model's structure, before calibration ----------------------------
def _prune_check(structure: Structure, options: dict, earlier: list[str]) -> None:
    settings = {**stage_options("prune"), **options}
    method_options = {k: v for k, v in options.items() if k not in _PRUNE_SETTINGS}
    check_prune(structure, settings["method"], method_options, settings["ratio"], settings["budget"], settings["min_keep"], settings["uniform"])


def _drop_check(structure: Structure, options: dict, earlier: list[str]) -> None:
    from .api import MODES, UNITS

    settings = {**stage_options("drop"), **options}
    if settings["unit"] not in UNITS or settings["mode"] not in MODES:
        raise MoECompressError(f"unit must be one of {', '.join(UNITS)} and mode one of {', '.join(MODES)}; got {settings['unit']!r}, {settings['mode']!r}.")
    check_drop(structure, settings["unit"], settings["n"], settings["target_ratio"])


def _condense_check(structure: Structure, options: dict, earlier: list[str]) -> None:
    settings = {**stage_options("condense"), **options}
    check_condense(structure, settings["layers"], settings["experts"])


def _finetune_check(structure: Structure, options: dict, earlier: list[str]) -> None:
    check_finetune(structure, "condense" in earlier)


def _slim_check(structure: Structure, options: dict, earlier: list[str]) -> None:
    from .slimming import SLIM_METHODS, make_spec

    settings = {**stage_options("slim"), **options}
    if settings["method"] not in SLIM_METHODS:
        raise MoECompressError(f"unknown slimming method {settings['method']!r}; choose one of {', '.join(SLIM_METHODS)}.")
    make_spec(settings["sparsity"], settings["nm"])
    check_slim(structure, settings["targets"])


def _quantize_check(structure: Structure, options: dict, earlier: list[str]) -> None:
    from .slimming.quantize import SCOPES

    settings = {**stage_options("quantize"), **options}
    if settings["bits"] not in (4, 8):
        raise MoECompressError(f"bits must be 4 or 8; got {settings['bits']}.")
    if settings["scope"] not in SCOPES:
        raise MoECompressError(f"scope must be one of {', '.join(SCOPES)}; got {settings['scope']!r}.")


#: kind -> check(structure of the input model, stage options, kinds of the stages before it).
#: The checks see the input model, so they test what must hold whatever the earlier stages do.
STAGE_CHECKS: dict[str, Callable[[Structure, dict, list[str]], None]] = {
    "prune": _prune_check, "drop": _drop_check, "condense": _condense_check, "finetune": _finetune_check,
    "slim": _slim_check, "quantize": _quantize_check,
}


def check_stages(data: dict, structure: Structure) -> None:
    """Every stage's options against the model's structure; the first problem is raised, naming its stage."""
    earlier: list[str] = []
    for position, stage in enumerate(data["stages"], 1):
        kind, options = next(iter(stage.items()))
        check = STAGE_CHECKS.get(kind)
        if check is not None:
            try:
                check(structure, dict(options or {}), earlier)
            except MoECompressError as exc:
                raise MoECompressError(f"stage {position} ({kind}): {exc}") from None
        earlier.append(kind)


def _output_of(recipe: str | Path | dict, data: dict, out: str | Path | None) -> Path:
    return Path(out or data.get("out") or "runs/recipe")


def _inputs(recipe: str | Path | dict, data: dict) -> list:
    return [data["model"], *([recipe] if isinstance(recipe, str | Path) else [])]


def describe_recipe(recipe: str | Path | dict, out: str | Path | None = None, overwrite: bool = False) -> list[str]:
    """A dry run: check the recipe, the output and every stage against the model's skeleton (no
    weights read, nothing calibrated or written), and say what a run would do."""
    from .preflight import skeleton

    data = load_recipe(recipe)
    target = _output_of(recipe, data, out)
    calibration = CalibrationSpec(**(data.get("calibration") or {}))
    calibration.validate()
    validate_output_dir(target, overwrite, _inputs(recipe, data))
    structure = skeleton(data["model"], trust_remote_code=data.get("trust_remote_code", False))
    check_stages(data, structure)
    evaluation = data.get("evaluate") or {}
    sources = _eval_sources(evaluation)
    experts = sorted(set(structure.experts.values()))
    lines = [
        f"dry run: recipe {recipe if not isinstance(recipe, dict) else '(dict)'} on {data['model']} "
        f"({structure.adapter.model_type}, {len(structure.adapter.decoder_layers(structure.model))} layers, "
        f"{len(structure.experts)} MoE layers of {'/'.join(map(str, experts))} experts, top-{structure.top_k}) -> {target}",
        f"calibration, built once for every stage: {calibration.samples} sequences x {calibration.seq_len} tokens from "
        f"{calibration.source} (seed {calibration.seed})",
        f"measured before and after every stage: {', '.join(sources) or 'no perplexity'}"
        + (f"; {_protocol(evaluation).describe()}" if sources else "") + ("; speed" if evaluation.get("speed") else ""),
        "stages:",
    ]
    for position, stage in enumerate(data["stages"], 1):
        kind, options = next(iter(stage.items()))
        shown = ", ".join(f"{k}={v}" for k, v in (options or {}).items()) or "defaults"
        lines.append(f"  {position}. {kind}: {shown}")
    lines.append("every stage was checked against the model's structure; nothing was calibrated or written.")
    return lines


@releases_outputs
def run_recipe(recipe: str | Path | dict, out: str | Path | None = None, overwrite: bool = False) -> dict:
    """Run every stage in order; returns the report (also written under `out`)."""
    data = load_recipe(recipe)
    out = _output_of(recipe, data, out)
    calibration = CalibrationSpec(**(data.get("calibration") or {}))
    calibration.validate()
    check_output_dir(out, overwrite, _inputs(recipe, data))
    device = data.get("device", "cpu")
    model, tokenizer = load_model(data["model"], device=device, trust_remote_code=data.get("trust_remote_code", False))
    check_stages(data, Structure.of(model, tokenizer))
    check_seq_len(calibration.seq_len, model.config, "calibration.seq_len")
    evaluation = data.get("evaluate") or {}
    eval_sets = _eval_sets(tokenizer, evaluation, model.config)
    batches = calibration_batches(tokenizer, calibration)
    speed_prompts = None
    if evaluation.get("speed"):
        speed_prompts = torch.cat(batches)[:4, :64]
    rows = [{"stage": "original", **_measure(model, eval_sets, speed_prompts, "original")}]
    plans: list[tuple[str, Plan]] = []
    work = staging_dir(out, "recipe")
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
                         **_measure(model, eval_sets, speed_prompts, f"after stage {position}, {kind}"), **outcome.info})
        saved = checkpoint or save_compressed(model, work / "checkpoint", tokenizer, plans[-1][1] if plans else None, overwrite=True)
        (saved / "plans").mkdir(exist_ok=True)
        for name, plan in plans:
            plan.save(saved / "plans" / f"{name}.json")
        protocol = _protocol(evaluation).describe() if eval_sets else None
        report = {"recipe": data, "rows": rows, "checkpoint_bytes": checkpoint_bytes(saved), "protocol": protocol}
        (saved / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (saved / "report.md").write_text(report_markdown(report))
        write_model_card(saved)  # again, now with the report
        publish(saved, out, overwrite)
        report["out"] = str(out)
    finally:
        discard_staging(work)
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
    notes = [f"Checkpoint: {report['checkpoint_bytes'] / 2**20:.2f} MiB."]
    if report.get("protocol"):
        notes.append(report["protocol"][0].upper() + report["protocol"][1:] + ".")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"
