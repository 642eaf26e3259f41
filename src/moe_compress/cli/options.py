"""Options several commands share, declared once: `Annotated` aliases, and bundles -- a dataclass of
options that `bundled` spreads into a command's signature and hands back to it as one object
(`load: Loading` becomes --dtype, --device, ... on the command line, and a `Loading` in the body).
A stage command's own options are a bundle made from the stage's declaration (`stage_options`)."""

import inspect
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import field, fields, make_dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from ..errors import named, parameter_names
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


#: Settings whose flag is not their name with dashes.
RENAMED = {"eval_ppl": "--eval", "allow_unreached": "--allow-unreached-experts", "sources": "--ppl", "json_out": "--json"}


def as_flags(description: str, flags: dict[str, str | tuple[str, ...]] | None = None) -> str:
    """A description as the command line shows it: the options it names (`errors.param`) as their flags (`flags`: this command's renamed)."""
    renamed = {name: flag if isinstance(flag, str) else flag[0] for name, flag in {**RENAMED, **(flags or {})}.items()}
    with parameter_names(lambda name: renamed.get(name, "--" + name.replace("_", "-"))):
        return named(description)


def _flag_type(annotation: object) -> object:
    """The type a flag takes for a declared option: a choice of names is a string, a list alone a repeated flag; of the
    forms a recipe also takes (a list beside a comma-separated string, a bool beside a path) the one a command line writes."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    members = typing.get_args(annotation) if union else (annotation,)
    kinds = [str if typing.get_origin(m) is typing.Literal else m for m in members if m is not type(None)]
    kinds = [k for k in kinds if k is not bool and typing.get_origin(k) is not list] if len(kinds) > 1 else kinds
    chosen = Path if Path in kinds else kinds[0]
    return chosen | None if type(None) in members else chosen


def _bundle(name: str, declared: list[tuple[str, object, object, str]], flags: dict[str, str | tuple[str, ...]] | None,
            bases: tuple[type, ...] = (), namespace: dict | None = None) -> type[Bundle]:
    """A bundle of options declared elsewhere, each (name, type, default, help): a flag named after it (`flags` renames
    one, or gives it aliases after its name; a switch is --name, or --name/--no-name unless it defaults to off), typed
    by `_flag_type`, its default a list's written comma-separated."""
    def option(field_name: str, annotation: object, default: object, help: str) -> tuple[str, object, object]:
        flag = (flags or {}).get(field_name, "--" + field_name.replace("_", "-"))
        flag, *aliases = (flag,) if isinstance(flag, str) else flag
        kind = _flag_type(annotation)
        decls = (flag if default is False else f"{flag}/--no-{flag[2:]}",) if kind in (bool, bool | None) else (flag, *aliases)
        default = ",".join(map(str, default)) if isinstance(default, list) else default
        return field_name, Annotated[kind, typer.Option(*decls, help=as_flags(help, flags))], field(default=default)

    return make_dataclass(name, [option(*one) for one in declared], bases=(*bases, Bundle), frozen=True, namespace=namespace or {})


def settings_options(settings: type, inherit: bool = True, flags: dict[str, str | tuple[str, ...]] | None = None) -> type[Bundle]:
    """The library's `settings` (a dataclass) as a bundle of options: its `described` fields' types, defaults and descriptions,
    flags renamed by `flags` (`_bundle`); the bundle is the settings too (`inherit`) or only carries their values (`asdict`)."""
    described = [f for f in fields(settings) if "description" in f.metadata]  # only these annotations are evaluated: others may name
    namespace = vars(sys.modules[settings.__module__])                       # classes the settings' module imports when type checking
    declared = [(f.name, eval(f.type, namespace) if isinstance(f.type, str) else f.type, f.default, f.metadata["description"]) for f in described]
    return _bundle(settings.__name__, declared, {**RENAMED, **(flags or {})}, (settings,) if inherit else ())


#: How the model is read and where it computes; the calibration text; perplexity before and after; the quality guard.
Loading = settings_options(LoadSettings)
Calibration = settings_options(CalibrationSettings)
Evaluation = settings_options(EvalSettings)
Guard = settings_options(GuardSettings)


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


def bundled(command: Callable, exclude: tuple[str, ...], defaults: dict[str, object]) -> Callable:
    """`command` with each parameter annotated with a `Bundle` spread into that bundle's options, in its place;
    the command receives the bundle. `exclude`: options the command does not offer (they keep the bundle's
    default); `defaults`: this command's defaults. An option the command declares itself keeps its declaration."""
    signature = inspect.signature(command, eval_str=True)
    own = set(signature.parameters)
    spread: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for parameter in signature.parameters.values():
        kind = parameter.annotation
        if not (isinstance(kind, type) and issubclass(kind, Bundle)):
            spread.append(parameter)
            continue
        names = [f.name for f in fields(kind) if f.name not in exclude]
        groups[parameter.name] = (kind, names)
        spread += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=f.type,
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
    """Register a command on `app` (named `name`, default its function's): user errors as one line, its bundles spread
    into options (`bundled` with `exclude` and `defaults`), and its docstring as help with each paragraph one line that
    --help wraps to the terminal (typer prints the paragraphs after the first with the docstring's own line breaks)."""
    def register(function: Callable) -> Callable:
        help = "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(function.__doc__).split("\n\n"))
        return app.command(name, help=help)(user_errors(bundled(function, exclude, defaults)))

    return register


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
