"""`moe-compress finetune`: train the condensed layers of a condensed model."""

from pathlib import Path
from typing import Annotated

import typer

from ..stages.options import FinetuneOptions
from .options import Loading, TrustOpt, VerifyOpt, stage_command

Out = Annotated[Path, typer.Option(help="Directory for the fine-tuned model; checkpoints go to <out>.checkpoints/.")]


@stage_command(FinetuneOptions, "finetune", out=Out, parts=("guard", "overwrite"))
def finetune(
    given,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps (0: only the final model).")] = 0,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... (default: a GPU if present).")] = None,
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
):
    """Fine-tune only the condensed layers' shared and kept experts of a condensed model."""
    from ..finetuning import training_device

    stage = given.stage()
    load = Loading(dtype="float32", device=training_device(device), trust_remote_code=trust_remote_code, verify_checksums=verify_checksums)
    return stage, {"load": load, "checkpoint_every": checkpoint_every}
