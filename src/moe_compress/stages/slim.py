"""Weight sparsity inside the experts (`slimming.slim`: magnitude, Wanda, SparseGPT), as a stage.

It uses the composition's calibration batches; the stored size does not change (the zeros
are stored densely), so it predicts its input's footprint.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..preflight import Structure, check_slim
from .options import SlimOptions
from .base import Job, Stage, StageContext, StageOutcome
from .registry import register_stage


@register_stage
class Slim(SlimOptions, Stage):
    """Zero weights inside the experts (and optionally shared experts / attention) of `model`."""

    kind: ClassVar[str] = "slim"
    streams: ClassVar[bool] = True
    positive: ClassVar[tuple[str, ...]] = ("blocksize",)
    routes_all_experts: ClassVar[bool] = True

    @classmethod
    def check_options(cls, options: dict[str, Any], planned: bool = False) -> None:
        from ..slimming import make_spec
        from ..slimming.apply import check_method
        from ..slimming.observe import check_targets

        check_method(options["method"])
        make_spec(options["sparsity"], options["nm"])
        check_targets(options["targets"])

    def run_one(self, model: Any, tokenizer: Any, job: Job) -> Any:
        from ..slimming import slim

        return slim(model, **self.settings(), calib=job.calib, tokenizer=tokenizer, out=job.out, overwrite=job.overwrite, device=job.device)

    def __init__(self, method: str | None = None, /, **given):
        super().__init__(**({"method": method, **given} if method is not None else given))

    def check(self, structure: Structure, earlier) -> None:
        from ..slimming import make_spec
        from ..slimming.apply import check_method

        check_method(self.method)
        make_spec(self.sparsity, self.nm)
        check_slim(structure, self.targets)

    def calibrates(self) -> str | None:
        return None if self.method == "magnitude" else f"collect each matrix's input statistics for {self.method}, one layer at a time"

    def explain(self, structure: Structure) -> list[str]:
        """The matrices and weights of each target kind it would zero (shapes only: a skeleton holds no values)."""
        from ..slimming import make_spec
        from ..slimming.observe import layer_collector
        from ..text.format import human_count

        counts: dict[str, list[int]] = {}
        chosen = check_slim(structure, self.targets)
        for index, layer in enumerate(structure.adapter.decoder_layers(structure.model)):
            for matrix in layer_collector(structure.adapter, layer, index, chosen, None).matrices:
                entry = counts.setdefault(matrix.kind, [0, 0])
                entry[0] += 1
                entry[1] += matrix.read().numel()
        pattern = make_spec(self.sparsity, self.nm).describe()
        return [f"would zero {pattern} of {kind}: {matrices} matrices, {human_count(weights)} weights, with {self.method}"
                for kind, (matrices, weights) in sorted(counts.items())]

    def run(self, context: StageContext) -> StageOutcome:
        from ..slimming import slim

        settings = self.settings()
        targets = settings.pop("targets")
        result = slim(context.model, calib=context.batches, tokenizer=context.tokenizer, device=context.device,
                      targets=tuple(targets) if isinstance(targets, list) else targets, **settings)
        reached = {kind: round(row["sparsity"], 4) for kind, row in result.summary["reached"].items()}
        return StageOutcome(result.model, None, {"sparsity_reached": reached})
