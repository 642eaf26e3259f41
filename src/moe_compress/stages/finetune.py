"""Fine-tuning the condensed layers of a CD-MoE model (`moe_compress.finetune`), as a stage."""

from __future__ import annotations

from typing import ClassVar

from ..preflight import Structure, check_finetune
from .base import Stage, StageContext, StageOutcome
from .registry import register_stage


@register_stage
class Finetune(Stage):
    """Train the condensed layers for `steps` steps; returns losses and before/after perplexity."""

    kind: ClassVar[str] = "finetune"

    data: str = "bundled"
    steps: int = 200
    lr: float = 1e-5
    batch_size: int = 8
    seq_len: int = 256
    seed: int = 0
    eval_data: str | None = "bundled"
    eval_windows: int = 32
    weight_decay: float = 0.01
    schedule: str = "linear"

    def check(self, structure: Structure, earlier) -> None:
        check_finetune(structure, any(stage.kind == "condense" for stage in earlier))

    def run(self, context: StageContext) -> StageOutcome:
        from ..finetuning import finetune

        report = finetune(context.model, context.tokenizer, device=context.device, **self.settings())
        return StageOutcome(context.model, None, report)
