"""`moe-compress finetune`: train the condensed layers of a condensed model."""

from dataclasses import replace
from typing import Annotated

import typer

from ..stages.options import FinetuneOptions
from .options import stage_command


@stage_command(FinetuneOptions, "finetune", out="Directory for the fine-tuned model; checkpoints go to <out>.checkpoints/.",
               parts=("guard", "overwrite", "load"), exclude=("dtype", "streaming", "threads", "max_activation_memory", "offload_dir"))
def finetune(
    given,
    load,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps (0: only the final model).")] = 0,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... (default: a GPU if present).")] = None,
):
    """Fine-tune only the condensed layers' shared and kept experts of a condensed model."""
    from ..finetuning import training_device

    stage = given.stage()
    return stage, {"load": replace(load, dtype="float32", device=training_device(device)), "checkpoint_every": checkpoint_every}
