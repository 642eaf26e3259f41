"""One registry of compression methods: each states the statistics it needs and plans from them.

The observer collects the union of statistics the chosen method declares, in one pass, and
the method turns them into a Plan. New methods join by calling `register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..arch.adapter import MoEAdapter, text_config
from ..errors import MoECompressError
from ..plan import Plan
from .budget import Budget
from .super_experts import find_super_experts, keep_super_experts

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
    #: The model itself, for methods that read expert weights while planning (REAM's neuron
    #: alignment); a method reads one decoder layer at a time from it, through `weights`
    #: (`source.residency`: in memory, or streamed from the checkpoint) when given.
    model: Any = None
    weights: Any = None
    #: Super experts per MoE layer that the plan must keep as they are (see `super_experts`).
    protected: dict[int, list[int]] = field(default_factory=dict)
    #: Experts each MoE layer keeps under an explicit budget (`budget.select_experts`); None otherwise.
    keep: dict[int, int] | None = None


#: Every method accepts this option: keep super experts (extreme activation outliers) intact.
PROTECT = "protect_super_experts"
PROTECT_HELP = "never remove or merge super experts (extreme down-projection outliers, see `moe-compress methods`)"


@dataclass(frozen=True)
class Method:
    """A registered method. `statistics` is a tuple of names, or a function of the options
    for methods whose statistics are parameterised (e.g. C-Prune's probe size)."""

    name: str
    statistics: tuple[str, ...] | Callable[[dict[str, Any]], tuple[str, ...]]
    plan: Callable[..., Plan]  # plan(request, **options)
    doc: str
    options: dict[str, Any] = field(default_factory=dict)  # name -> default
    #: name -> one line saying what the option does (`moe-compress methods NAME` prints it); the
    #: option's type is its parameter's annotation in `plan` (`methods.options`).
    option_help: dict[str, str] = field(default_factory=dict)
    #: Plans with `request.protected` itself (merging); otherwise removed super experts are swapped back in.
    protects: bool = False
    #: Default of the super-expert guard for this method (measured in bench/pruning.py).
    protect_default: bool = True
    #: "pruning" or "merging": how `moe-compress methods` groups it, and whether its statistics join
    #: the superset one cached calibration pass collects (`engine.statistics.superset_statistics`): merging
    #: statistics may run every expert on every token, which pruning methods must not pay for.
    family: str = "pruning"
    #: Whether it can plan to kept counts given per layer (budget "explicit", what `fit` allocates with):
    #: cprune-cosine's affinity clusters decide their counts themselves.
    explicit_budget: bool = True
    #: Removed experts become constants (MoNE's novices): every router row stays, and one vector per
    #: removed expert and a slot map per layer are written (`stages.sizes.candidate_bytes`).
    substitutes: bool = False
    #: Under a layer or an explicit budget, each layer's plan reads that layer's statistics alone (the super-expert
    #: guard aside, which `engine.fused` settles itself): a streamed prune may then plan and write each layer during
    #: its calibration walk. tests/test_fused_prune.py checks the claim for every method that makes it.
    layer_local: bool = False

    def resolved_options(self, options: dict[str, Any] | None) -> dict[str, Any]:
        options = dict(options or {})
        unknown = set(options) - set(self.options) - {PROTECT}
        if unknown:
            known = ", ".join(sorted([*self.options, PROTECT]))
            raise MoECompressError(f"method {self.name!r} has no option(s) {sorted(unknown)}; its options: {known}.")
        return {PROTECT: self.protect_default, **self.options, **options}

    def needs(self, options: dict[str, Any] | None = None) -> tuple[str, ...]:
        """The statistics to observe for these options."""
        resolved = self.resolved_options(options)
        guard = resolved.pop(PROTECT)
        names = self.statistics(resolved) if callable(self.statistics) else self.statistics
        return tuple(dict.fromkeys([*names, *(("max_output_abs",) if guard else ())]))

    def check_budget(self, budget: str) -> None:
        if budget == "explicit" and not self.explicit_budget:
            raise MoECompressError(f"method {self.name!r} decides its per-layer counts itself: it takes budget 'layer' or 'global', not 'explicit'.")

    def make_plan(self, request: PlanRequest, options: dict[str, Any] | None = None) -> Plan:
        self.check_budget(request.budget)
        resolved = self.resolved_options(options)
        guard = resolved.pop(PROTECT)
        protected = find_super_experts(request.stats, text_config(request.config).num_hidden_layers) if guard else {}
        plan = self.plan(replace(request, protected=protected), **resolved)
        swaps = [] if self.protects else keep_super_experts(plan, protected, request.stats)
        plan.meta[PROTECT] = guard
        if guard:
            plan.meta["super_experts"] = {str(layer): experts for layer, experts in protected.items()}
            plan.meta["super_expert_swaps"] = swaps
        plan.validate()
        return plan


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method; a name already taken is an error (a silent overwrite would change what a
    saved plan or recipe naming it means)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered; choose another name.")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MoECompressError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
