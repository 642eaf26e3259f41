"""Options several commands share, declared once: `Annotated` aliases, and bundles -- a dataclass of
options that `bundled` spreads into a command's signature and hands back to it as one object
(`load: Loading` becomes --dtype, --device, ... on the command line, and a `Loading` in the body).
A stage command's own options are a bundle made from the stage's declaration (`stage_options`)."""

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import field, fields, make_dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from ..loading import LoadSettings
from ..stage_command import CalibrationSettings, EvalSettings, GuardSettings
from ..progress import show
from .common import app, user_errors

ModelArg = Annotated[str, typer.Argument(help="Checkpoint directory, bundled model name (ref-mixtral, ref-deepseek) or Hub id.")]
CacheDirOpt = Annotated[Path | None, typer.Option(help="Where calibration statistics are cached. Default: $MOE_COMPRESS_CACHE/stats if that variable is set, else ~/.cache/moe_compress/stats.")]
IgnorePlanIdentityOpt = Annotated[bool, typer.Option(
    "--ignore-plan-identity",
    help="Apply the plan even when its weights fingerprint does not match this model's or cannot be compared with it "
         "(a plan without one, or one made streamed applied to a model in memory that was not read from its checkpoint), "
         "with a warning; e.g. a plan made on a base model for its fine-tune. Layer, expert and routing counts are always checked.",
)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Check every input, print what would be done (the plan itself with --plan-in) and exit: no calibration, nothing written.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")]


class Bundle:
    """A dataclass of options that `bundled` spreads into a command's signature."""


def _flag_type(annotation: object) -> object:
    """The type a flag takes for a declared option: a choice of names is a string; of the forms a recipe also
    takes (a list beside a comma-separated string, a bool beside a path) the one a command line writes."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    kinds = [str if typing.get_origin(m) is typing.Literal else m for m in members if m is not type(None) and typing.get_origin(m) in (None, typing.Literal)]
    kinds = [k for k in kinds if k is not bool] if len(kinds) > 1 else kinds
    chosen = Path if Path in kinds else kinds[0]
    return chosen | None if type(None) in members else chosen


def _bundle(name: str, declared: list[tuple[str, object, object, str]], flags: dict[str, str] | None, bases: tuple[type, ...] = (),
            namespace: dict | None = None) -> type[Bundle]:
    """A bundle of options declared elsewhere, each (name, type, default, help): a flag named after it (`flags` renames
    one; a switch is --name, or --name/--no-name where it defaults to on), typed by `_flag_type`, its default a list's
    written comma-separated."""
    def option(field_name: str, annotation: object, default: object, help: str) -> tuple[str, object, object]:
        flag = (flags or {}).get(field_name, "--" + field_name.replace("_", "-"))
        kind = _flag_type(annotation)
        decls = (flag if not default else f"{flag}/--no-{flag[2:]}",) if kind is bool else (flag,)
        default = ",".join(map(str, default)) if isinstance(default, list) else default
        return field_name, Annotated[kind, typer.Option(*decls, help=help)], field(default=default)

    return make_dataclass(name, [option(*one) for one in declared], bases=(*bases, Bundle), frozen=True, namespace=namespace or {})


def settings_options(settings: type, flags: dict[str, str] | None = None, **helps: str) -> type[Bundle]:
    """The library's `settings` (a dataclass) as a bundle of options: its fields' types and defaults, the help given here."""
    hints = typing.get_type_hints(settings)
    return _bundle(settings.__name__, [(f.name, hints[f.name], f.default, helps[f.name]) for f in fields(settings)], flags, (settings,))


#: How the model is read and where it computes.
Loading = settings_options(
    LoadSettings,
    dtype="Weights dtype in memory: auto (as saved), float32, bfloat16 or float16.",
    device="Device for computation (cpu, cuda, cuda:1). Layers visit it one at a time while calibrating.",
    trust_remote_code="Run Python code shipped inside the checkpoint (its auto_map). Off by default: only for checkpoints whose authors you trust. moe-compress's own outputs load without it.",
    verify_checksums="Before loading, hash every file of the checkpoint and compare it with the sha256 (git sha1 for small files) its Hugging Face cache snapshot records: its blob's name. A damaged file is refused, naming it. Only a Hub cache snapshot records hashes: a plain directory (save_pretrained or moe-compress outputs, files copied out of the cache) or a Hub id is refused with this option. Without it, only the safetensors headers and finite weights are checked.",
    streaming="auto: read the model layer by layer from its checkpoint unless 2.5 times its weights (what a whole load peaks at) fit in the free memory (RAM within the container's limit, or GPU memory with --device cuda), else load it whole; on: always stream; off: always load whole. Streaming gives the same results with one layer in memory.",
    threads="CPU threads for torch (default: torch's choice). On a shared machine, fewer threads than busy cores avoids stalls.",
    max_activation_memory="Keep at most this much calibration activation memory in RAM (e.g. 4GiB, 500MB; a plain number means GiB); the rest goes to files in --offload-dir. Default: no limit.",
    offload_dir="Directory for activations beyond --max-activation-memory (default: the system temp dir).",
)
Calibration = settings_options(
    CalibrationSettings,
    calib="Calibration text: a file (.txt/.jsonl/.parquet), a directory, 'bundled[:domain]' or 'hf:<dataset>'.",
    samples="Number of calibration sequences.",
    seq_len="Tokens per calibration sequence.",
    seed="Seed that picks the calibration sequences.",
    batch_size="Sequences per forward pass.",
    text_field="Field/column holding the text in .jsonl/.parquet/datasets.",
)
Evaluation = settings_options(
    EvalSettings, {"eval_ppl": "--eval"},
    eval_ppl="Measure perplexity on this text before and after (same forms as --calib; 'bundled': each bundled domain's test split), with the evaluation protocol of --eval-windows / --eval-seq-len.",
    eval_windows="Perplexity windows per text source for --eval (the evaluation protocol; see `moe-compress eval --help`).",
    eval_seq_len="Tokens per perplexity window for --eval (independent of the calibration --seq-len).",
)
Guard = settings_options(
    GuardSettings, {"allow_unreached": "--allow-unreached-experts"},
    guard_min_top1="The quality guard compares the saved output with the input on held-out calibration text and exits 2 (the output kept, its card "
                   "marked FAILED, the worst layer named) when top-1 agreement falls below this; default 0.9 after quantize, 0.25 after the others.",
    no_guard="Skip the quality guard (it reads the input and the output once more).",
    allow_unreached="Pass the quality guard even when the stage recorded experts that no calibration token reached (and so treated them without data); "
                    "they are still named in the card.",
)


def stage_options(declared: type[BaseModel], exclude: tuple[str, ...] = (), flags: dict[str, str] | None = None) -> type[Bundle]:
    """A bundle of a stage's options as `stages.options` declares them (`PruneOptions` for the stage "prune"), each with its
    description as help (`_bundle`; `exclude`: fields without a flag). Its `stage(planned, **extra)` builds the stage
    (`stage_command.build_stage`: every value checked first, those that differ from the defaults given)."""
    def stage(self, planned: bool = False, **extra: object):
        from ..stage_command import build_stage

        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}
        return build_stage(declared.__name__.removesuffix("Options").lower(), {**given, **extra}, planned)

    options = [(name, info.annotation, info.default, info.description) for name, info in declared.model_fields.items() if name not in exclude]
    return _bundle(declared.__name__, options, flags, namespace={"stage": stage})


def bundled(command: Callable, exclude: tuple[str, ...] = (), defaults: dict[str, object] | None = None) -> Callable:
    """`command` with each parameter annotated with a `Bundle` spread into that bundle's options, in its place;
    the command receives the bundle. `exclude`: options the command does not offer (they keep the bundle's
    default); `defaults`: this command's defaults. An option the command declares itself keeps its declaration."""
    defaults = defaults or {}
    signature = inspect.signature(command, eval_str=True)
    own = set(signature.parameters)
    spread: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for parameter in signature.parameters.values():
        kind = parameter.annotation
        if not (isinstance(kind, type) and issubclass(kind, Bundle)):
            spread.append(parameter)
            continue
        hints = typing.get_type_hints(kind, include_extras=True)
        names = [f.name for f in fields(kind) if f.name not in exclude]
        groups[parameter.name] = (kind, names)
        spread += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                                     default=defaults.get(f.name, f.default)) for f in fields(kind) if f.name in names and f.name not in own]

    @wraps(command)
    def wrapper(**kwargs):
        for name, (kind, names) in groups.items():
            kwargs[name] = kind(**{n: kwargs[n] if n in own else kwargs.pop(n) for n in names})
        return command(**kwargs)

    wrapper.__signature__ = signature.replace(parameters=spread)
    wrapper.__annotations__ = {p.name: p.annotation for p in spread}
    return wrapper


def command(name: str | None = None, exclude: tuple[str, ...] = (), **defaults: object) -> Callable[[Callable], Callable]:
    """Register a command on `app` (named `name`, default its function's): user errors as one line, and its
    bundles spread into options (`bundled` with `exclude` and `defaults`)."""
    return lambda function: app.command(name)(user_errors(bundled(function, exclude, defaults)))


#: What a stage command may share, as (annotation, default), in --help order after MODEL, --out and the stage's options.
_SHARED = {"calibration": (Calibration, Calibration()), "evaluation": (Evaluation, Evaluation()), "guard": (Guard, Guard()),
           "plan_out": (Annotated[Path | None, typer.Option(help="Also write the plan JSON here (it is always saved in --out).")], None), "overwrite": (OverwriteOpt, False), "cache_dir": (CacheDirOpt, None),
           "load": (Loading, Loading()), "dry_run": (DryRunOpt, False)}
#: What every stage command but finetune shares.
STAGE_PARTS = ("calibration", "guard", "overwrite", "load", "dry_run")


def stage_command(declared: type[BaseModel], name: str | None = None, *, out: str = "Directory to write the result to (written atomically).", flags: dict[str, str] | None = None,
                  omit: tuple[str, ...] = (), parts: tuple[str, ...] = STAGE_PARTS, exclude: tuple[str, ...] = (),
                  **defaults: object) -> Callable[[Callable], Callable]:
    """Register a stage command (`command`'s `name`, `exclude`, `defaults`) whose function declares only what is its own.
    The command offers MODEL, --out (`out`: its help), the stage's options (`stage_options(declared, omit, flags)`),
    the function's own options and the shared `parts` (of `_SHARED`). The function takes its own options and, by name, the
    shared values it reads (`given`: the stage's options); it returns the stage, or the stage and the `run_stage` arguments
    it sets itself; the command runs it (`stage_command.run_stage`) and prints the report."""
    given = stage_options(declared, omit, flags)
    def parameter(name: str, annotation: object, *default: object) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation, default=next(iter(default), inspect.Parameter.empty))

    def register(function: Callable) -> Callable:
        reads = inspect.signature(function).parameters
        head = [parameter("model", ModelArg), parameter("out", Annotated[Path, typer.Option(help=out)]), parameter("given", given, given())]
        own = [p for n, p in reads.items() if n not in _SHARED and n != "given"]
        shared = [parameter(n, *_SHARED[n]) for n in _SHARED if n in parts]

        @wraps(function)
        def run(model: str, **values: object) -> None:
            from ..stage_command import run_stage

            made = function(**{n: values[n] for n in reads})
            stage, arguments = made if isinstance(made, tuple) else (made, {})
            if "calib" not in arguments:
                arguments["calib"] = values["calibration"].spec() if "calibration" in parts else None
            show(run_stage(stage, model, values["out"], **{**{n: values[n] for n in parts if n != "calibration"}, **arguments}))

        run.__signature__ = inspect.Signature(head + own + shared)
        return command(name, exclude, **defaults)(run)

    return register
