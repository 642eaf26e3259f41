"""Fine-tuning the condensed layers of a CD-MoE model (`moe_compress.finetune`), as a stage."""

from __future__ import annotations

from typing import Any, ClassVar

from ..errors import MoECompressError, param
from ..preflight import Structure, check_finetune
from .options import FinetuneOptions
from .base import Job, Stage, StageContext, StageOutcome, load_whole
from .registry import register_stage


@register_stage
class Finetune(FinetuneOptions, Stage):
    """Train the condensed layers for `steps` steps; returns losses and before/after perplexity."""

    kind: ClassVar[str] = "finetune"
    positive: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "seq_len")

    @classmethod
    def check_options(cls, options: dict[str, Any], planned: bool = False) -> None:
        from ..data.batches import check_seed

        check_seed(options["seed"])
        if options["lr"] <= 0:
            raise MoECompressError(f"{param('lr')} must be a positive number; got {options['lr']}.")

    def guard_text(self, calib: Any) -> Any:
        """Its evaluation text: its training text is no held-out text."""
        from ..evaluate.guard import HeldOutText

        return HeldOutText(self.eval_data, self.seq_len)

    def run_one(self, model: str, tokenizer: Any, job: Job) -> dict:
        """Loaded whole in float32 on the CPU; `finetune` moves it to the device it trains on."""
        from ..finetuning import finetune

        loaded, tokenizer = load_whole(model, job, dtype="float32", device="cpu")
        return finetune(loaded, tokenizer, **self.settings(), out=job.out, overwrite=job.overwrite, device=job.device, **job.extra)

    def check(self, structure: Structure, earlier) -> None:
        check_finetune(structure, any(stage.kind == "condense" for stage in earlier))

    def run(self, context: StageContext) -> StageOutcome:
        from ..finetuning import finetune

        report = finetune(context.model, context.tokenizer, device=context.device, **self.settings())
        return StageOutcome(context.model, None, report)
