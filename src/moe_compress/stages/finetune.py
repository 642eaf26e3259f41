"""Fine-tuning the condensed layers of a CD-MoE model (`moe_compress.finetune`), as a stage."""

from __future__ import annotations

from typing import ClassVar


from ..preflight import Structure, check_finetune
from .options import FinetuneOptions
from .base import Stage, StageContext, StageOutcome
from .registry import register_stage


@register_stage
class Finetune(FinetuneOptions, Stage):
    """Train the condensed layers for `steps` steps; returns losses and before/after perplexity."""

    kind: ClassVar[str] = "finetune"

    def check(self, structure: Structure, earlier) -> None:
        check_finetune(structure, any(stage.kind == "condense" for stage in earlier))

    def run(self, context: StageContext) -> StageOutcome:
        from ..finetuning import finetune

        report = finetune(context.model, context.tokenizer, device=context.device, **self.settings())
        return StageOutcome(context.model, None, report)
