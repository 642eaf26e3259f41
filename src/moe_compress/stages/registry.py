"""Every stage kind, by the name recipes use: the one list recipes, dry runs, listings and the API read.

A built-in stage is one module of this package plus one line in `BUILTIN`; a stage from
outside joins with `register_stage(MyStage)`. A name registered twice is an error: a recipe
naming it would silently run another stage (lm-evaluation-harness refuses the same way).
The modules are imported when the registry is first read, not when `moe_compress` is.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ..errors import MoECompressError
from .base import Stage, StageOptionError

#: kind -> module of this package that defines it (imported on first use)
BUILTIN = {
    "prune": ".prune",
    "drop": ".drop",
    "condense": ".condense",
    "finetune": ".finetune",
    "slim": ".slim",
    "quantize": ".quantize",
}

_REGISTERED: dict[str, type[Stage]] = {}


def register_stage(stage: type[Stage]) -> type[Stage]:
    """Add a stage kind (usable as a class decorator). Its `kind` must be new."""
    if not (isinstance(stage, type) and issubclass(stage, Stage)) or not isinstance(getattr(stage, "kind", None), str):
        raise TypeError("register_stage takes a subclass of moe_compress.stages.Stage with a `kind` name.")
    if stage.kind in _REGISTERED or (stage.kind in BUILTIN and stage.__module__ != f"{__package__}{BUILTIN[stage.kind]}"):
        raise ValueError(f"a stage named {stage.kind!r} is already registered; choose another name.")
    _REGISTERED[stage.kind] = stage
    return stage


def stages() -> dict[str, type[Stage]]:
    """Every registered kind, built-ins first (importing their modules registers them)."""
    for module in BUILTIN.values():
        import_module(module, __package__)
    return {**{kind: _REGISTERED[kind] for kind in BUILTIN}, **_REGISTERED}


def stage_class(kind: str) -> type[Stage]:
    known = stages()
    if kind not in known:
        raise MoECompressError(f"unknown stage kind {kind!r}; available: {', '.join(sorted(known))}.")
    return known[kind]


def build_stage(kind: str, options: dict[str, Any] | None, where: str | None = None) -> Stage:
    """A stage from its kind and options (a recipe's `- kind: {options}`); a problem is one line
    beginning with `where` (e.g. "stage 2 (prune)")."""
    try:
        return stage_class(kind)(**(options or {}))
    except StageOptionError as exc:
        raise MoECompressError(f"{where or kind}: {exc.detail}") from None
