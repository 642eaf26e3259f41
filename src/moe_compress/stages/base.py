"""The one shape every compression stage has.

A stage (prune, drop, condense, finetune, slim, quantize, or one a user registers) is a typed,
immutable set of options that knows four things about itself, in the order a run needs them:

* `check(structure, earlier)`: refuse what cannot succeed, from the model's structure alone
  (a meta skeleton is enough), before any weight is read or any token calibrated;
* `describe()`: one line saying what it will do (the dry run, the recipe report, the card);
  a dry run adds `calibrates()` (what it reads calibration text for) and `explain(structure)`
  (what the structure already tells, e.g. the experts each layer keeps);
* `predict(footprint)`: what the model will weigh after it, from the config and the shard
  headers (`stages.sizes`), so a budget search can rank compositions without running them;
* `run(context)`: do it, on the model the stage before it produced.

A stage is also a command on its own (`moe-compress prune ...`, `command.run_stage`): then
`check_options()` refuses bad values before any file is read, and `run_one(model, tokenizer, job)`
runs its one-model library call (`stages.prune.prune`, ...) on a checkpoint -- on the model the
command opened (streamed where that call streams) when `streams`, else from its path.

The options are a pydantic model: unknown names are refused (a typo must not fall back to a
default), values are checked strictly (a recipe's "0.25" is not 0.25), and floats must be
finite. Every refusal is one line naming the option and the values it takes, the same for a
recipe and for Python (`mc.Prune(ratio="high")`).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from ..errors import MoECompressError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..plan import Plan
    from ..preflight import Structure
    from .footprint import Footprint


class StageOptionError(MoECompressError):
    """A stage option that is unknown or of the wrong type; `detail` is the message without the stage's name."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.detail = detail


@dataclass
class StageContext:
    """What a stage may use: the current model, its tokenizer and the calibration batches shared by every stage."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    batches: list[torch.Tensor]
    device: str = "cpu"
    scratch: Path | None = None  # a private directory for stages that write checkpoints


@dataclass(frozen=True)
class Job:
    """What a single command gives a stage's one-model call besides its options: the calibration, the output,
    how to open the checkpoint, and the command's own arguments to that call (`extra`: prune's plan, cache_dir)."""

    calib: Any
    out: Path
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "auto"
    trust_remote_code: bool = False
    streaming: bool | str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageOutcome:
    """What a stage gives the next: its model, the plan it applied (structural stages) and facts for the report."""

    model: PreTrainedModel
    plan: Plan | None = None
    info: dict = field(default_factory=dict)
    checkpoint: Path | None = None  # set by a final stage that already wrote the output checkpoint


def _lists(value: Any) -> Any:
    """Tuples as lists, at any depth: Python callers write tuples where a recipe writes lists."""
    if isinstance(value, tuple):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


class Stage(BaseModel):
    """Base of every stage kind; a subclass sets `kind`, declares its options as fields and overrides `run`."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    #: the name recipes use for it (`- prune: {...}`), unique in the registry
    kind: ClassVar[str]
    #: a final stage writes the output checkpoint itself, so it must be the last one
    final: ClassVar[bool] = False
    #: as a command: its call takes the model the command opened (in memory or streamed, measured before and after)
    streams: ClassVar[bool] = False
    #: as a command: the options that must be integers >= 1 (checked before anything is read)
    positive: ClassVar[tuple[str, ...]] = ()
    #: it takes the option `calibrate_all_experts` (calibration routed to every routed expert), so the quality
    #: guard offers that option when it names experts calibration never reached (`evaluate.guard`)
    routes_all_experts: ClassVar[bool] = False

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every option's default (a command checks the values it was given over these before building the stage)."""
        return {name: info.get_default(call_default_factory=True) for name, info in cls.model_fields.items()}

    _order: list[str] = PrivateAttr(default_factory=list)  # the options as the caller gave them, in its order

    def __init__(self, **options: Any):
        try:
            super().__init__(**options)
        except ValidationError as exc:
            raise StageOptionError(type(self).kind, option_problem(type(self), exc, options)) from None
        self._order = list(options)

    @model_validator(mode="before")
    @classmethod
    def _tuples_as_lists(cls, data: Any) -> Any:
        return _lists(data) if isinstance(data, dict) else data

    # ---- what every stage answers -----------------------------------------------------
    def check(self, structure: Structure, earlier: Sequence[Stage]) -> None:
        """Refuse, from the input model's structure, what cannot succeed whatever the earlier stages do."""

    def describe(self) -> str:
        """One line: the kind and the options the user set (the defaults go unsaid)."""
        shown = ", ".join(f"{name}={value}" for name, value in self.given().items())
        return f"{self.kind}: {shown or 'defaults'}"

    def calibrates(self) -> str | None:
        """What the stage reads the calibration text for (a dry run says so); None: it reads none."""
        return None

    def explain(self, structure: Structure) -> list[str]:
        """What a dry run can already tell, from the input's structure alone, about what this stage would do."""
        return []

    def predict(self, footprint: Footprint) -> Footprint:
        """The model's size after this stage; a stage that changes no stored byte returns its input."""
        return footprint

    def run(self, context: StageContext) -> StageOutcome:
        raise NotImplementedError(f"stage {self.kind!r} does not say how it runs")

    # ---- as a command of its own ------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any], planned: bool = False) -> None:
        """Refuse, before the stage is built or any file read, values no model can take (`options`: every option,
        defaults included, as the command gives them); `planned`: a saved plan decides (prune --plan-in)."""

    def before_loading(self, model: str, job: Job) -> None:
        """Refuse, before a weight is read, what the checkpoint `model` cannot afford (a stage that holds it whole)."""

    def guard_text(self, calib: Any) -> Any:
        """The text the quality guard reads after this stage: the calibration's held-out windows."""
        return calib

    def run_one(self, model: Any, tokenizer: Any, job: Job) -> Any:
        """The stage's one-model library call on `model` (the opened model's `Weights` when `streams`, else its path)."""
        raise NotImplementedError(f"stage {self.kind!r} has no command of its own")

    # ---- helpers --------------------------------------------------------------------------
    def given(self) -> dict[str, Any]:
        """The options set explicitly, in the order given (what a recipe wrote)."""
        return {name: getattr(self, name) for name in self._order}

    def settings(self) -> dict[str, Any]:
        """Every option with its value, defaults included (what the stage runs with)."""
        return {name: getattr(self, name) for name in type(self).model_fields}


def load_whole(model: str, job: Job, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """`source.load.load_model` of a checkpoint, as `job` says (`kwargs` override), with a progress line: it takes minutes."""
    from ..progress import step
    from ..source.load import load_model

    with step(f"loading {model}"):
        return load_model(model, **{"dtype": job.dtype, "device": job.device, "trust_remote_code": job.trust_remote_code, **kwargs})


# ---- one-line messages from pydantic's errors ----------------------------------------------
_NAMES = {int: "an integer", float: "a finite number", str: "a string", Path: "a string", bool: "true or false", type(None): "null"}


def type_name(annotation: Any) -> str:
    """What a value of this annotation is, in words a recipe author reads."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(type_name(a) for a in args))
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list):
        return f"a list of {type_name(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or annotation is dict:
        return "a mapping"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def describe_value(value: Any) -> str:
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def option_problem(model: type[BaseModel], exc: ValidationError, given: dict[str, Any]) -> str:
    """The first problem pydantic found in the options `given`, as one line: an unknown option
    names the known ones; a wrong value names the type the option takes and the value it got."""
    error = exc.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else ""
    known = ", ".join(sorted(model.model_fields))
    if error["type"] == "extra_forbidden":
        return f"unknown option {name!r}; known: {known}."
    if name not in model.model_fields:
        return f"{error['msg']}."
    value = given.get(name, error.get("input"))
    return f"option {name!r} must be {type_name(model.model_fields[name].annotation)}; got {describe_value(value)}."
