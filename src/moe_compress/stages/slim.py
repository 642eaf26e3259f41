"""Weight sparsity inside the experts (`slimming.slim`: magnitude, Wanda, SparseGPT), as a stage.

It uses the composition's calibration batches; the stored size does not change (the zeros
are stored densely), so it predicts its input's footprint.
"""

from __future__ import annotations

from typing import ClassVar

from ..preflight import Structure, check_slim
from .base import Stage, StageContext, StageOutcome
from .registry import register_stage


@register_stage
class Slim(Stage):
    """Zero weights inside the experts (and optionally shared experts / attention) of `model`."""

    kind: ClassVar[str] = "slim"

    method: str = "wanda"
    sparsity: float | None = None
    nm: list[int] | str | None = None
    targets: list[str] | str = ["experts"]
    blocksize: int = 128
    damp: float = 0.01
    propagate: bool = True

    def __init__(self, method: str | None = None, /, **given):
        super().__init__(**({"method": method, **given} if method is not None else given))

    def check(self, structure: Structure, earlier) -> None:
        from ..slimming import make_spec
        from ..slimming.apply import check_method

        check_method(self.method)
        make_spec(self.sparsity, self.nm)
        check_slim(structure, self.targets)

    def run(self, context: StageContext) -> StageOutcome:
        from ..slimming import slim

        settings = self.settings()
        targets = settings.pop("targets")
        result = slim(context.model, calib=context.batches, tokenizer=context.tokenizer, device=context.device,
                      targets=tuple(targets) if isinstance(targets, list) else targets, **settings)
        reached = {kind: round(row["sparsity"], 4) for kind, row in result.summary["reached"].items()}
        return StageOutcome(result.model, None, {"sparsity_reached": reached})
