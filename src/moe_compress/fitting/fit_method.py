"""What `fit` allocates with: a method that plans to per-layer kept counts, with the method's own options.

The proxies ask its explicit plans which experts each count keeps, the candidates prune with it, and the
single-method baseline is it alone: all three must see the same options (C-Prune's `clusters`, REAP's
`renormalize`, MoNE's `novice`, ...), or the search prices one method and writes another. The options are
checked as `Prune` checks them, by the method's own option types, before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MoECompressError, OptionError
from .accepted import FIT_METHODS

if TYPE_CHECKING:
    from ..methods import Method, PlanRequest
    from ..plan import Plan
    from ..stages.prune import Prune


def check_method(method: str) -> None:
    """fit allocates with a method that plans to kept counts given per layer, which the proxies price (`accepted`)."""
    if method not in FIT_METHODS:
        raise MoECompressError(f"fit allocates with one of {', '.join(FIT_METHODS)} (the methods that take per-layer kept counts); got {method!r}.")


@dataclass(frozen=True)
class FitMethod:
    """The method `fit` allocates with: one of `accepted.FIT_METHODS`, and its options (as `prune --option KEY=VALUE` gives them)."""

    method: str = "reap"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from ..methods.options import unknown_option
        from ..stages.base import StageOptionError

        check_method(self.method)
        for name in self.options:  # named among the method's options alone: fit takes none of the prune stage's fields
            problem = unknown_option(self.chosen, name)
            if problem:
                raise OptionError("method_options", problem)
        try:
            self.prune(ratio=0.5)  # the method's own option types, as a prune stage checks them
        except StageOptionError as error:
            raise OptionError("method_options", f"of {self.method}: {error.detail}") from None

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method} ({shown})" if shown else self.method

    @property
    def chosen(self) -> Method:
        from ..methods import get_method

        return get_method(self.method)

    @property
    def substitutes(self) -> bool:
        """Whether the removed experts stay as novices, which weigh something (`Method.substitutes`)."""
        return self.chosen.substitutes

    def needs(self) -> tuple[str, ...]:
        """The statistics the method's plans read with these options."""
        return tuple(self.chosen.needs(dict(self.options)))

    def plan(self, request: PlanRequest, **overrides: Any) -> Plan:
        """The method's plan for `request` with these options (`overrides` on top)."""
        return self.chosen.make_plan(request, {**self.options, **overrides})

    def prune(self, **fields: Any) -> Prune:
        """The prune stage of this method and options with the stage's own `fields` (ratio, budget, keep, ...)."""
        from ..stages.prune import Prune

        return Prune(self.method, **fields, **({"options": dict(self.options)} if self.options else {}))
