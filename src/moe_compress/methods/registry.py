"""One registry of compression methods: each states the statistics it needs and plans from them.

The observer collects the union of statistics the chosen method declares, in one pass, and
the method turns them into a Plan. New methods join by calling `register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..arch.adapter import MoEAdapter
from ..errors import MoECompressError
from ..plan import Plan
from .budget import Budget

Stats = dict[int, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PlanRequest:
    """What every expert-pruning planner receives."""

    adapter: MoEAdapter
    config: Any
    stats: Stats
    ratio: float
    budget: Budget = "layer"
    min_keep: int = 0


@dataclass(frozen=True)
class Method:
    """A registered method. `statistics` is a tuple of names, or a function of the options
    for methods whose statistics are parameterised (e.g. C-Prune's probe size)."""

    name: str
    statistics: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]]
    plan: Callable[..., Plan]  # plan(request, **options)
    doc: str
    options: dict[str, Any] = field(default_factory=dict)  # name -> default
    #: "pruning" or "merging": how `moe-compress methods` groups it, and whether its statistics join
    #: the superset one cached calibration pass collects (`api.superset_statistics`): merging
    #: statistics may run every expert on every token, which pruning methods must not pay for.
    family: str = "pruning"

    def resolved_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        options = dict(options or {})
        unknown = set(options) - set(self.options)
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise MoECompressError(f"method {self.name!r} has no option(s) {sorted(unknown)}; its options: {known}.")
        return {**self.options, **options}

    def needs(self, options: dict[str, Any] | None = None) -> tuple[str, ...]:
        """The statistics to observe for these options."""
        return self.statistics(self.resolved_options(options)) if callable(self.statistics) else self.statistics

    def make_plan(self, request: PlanRequest, options: dict[str, Any] | None = None) -> Plan:
        plan = self.plan(request, **self.resolved_options(options))
        plan.validate()
        return plan


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MoECompressError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
