"""`moe-compress finetune`: train the condensed layers of a condensed model."""

from pathlib import Path
from typing import Annotated

import typer

from ..stages.options import FinetuneOptions
from .common import show
from .options import Guard, Loading, ModelArg, OverwriteOpt, TrustOpt, VerifyOpt, command, stage_options

Options = stage_options(FinetuneOptions)


@command("finetune")
def finetune_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for the fine-tuned model; checkpoints go to <out>.checkpoints/.")],
    given: Options = Options(),
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps (0: only the final model).")] = 0,
    guard: Guard = Guard(),
    overwrite: OverwriteOpt = False,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... (default: a GPU if present).")] = None,
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
) -> None:
    """Fine-tune only the condensed layers' shared and kept experts of a condensed model."""
    from ..finetuning import training_device
    from ..stage_command import run_stage

    stage = given.stage()
    load = Loading(dtype="float32", device=training_device(device), trust_remote_code=trust_remote_code, verify_checksums=verify_checksums)
    show(run_stage(stage, model, out, None, load, guard, overwrite=overwrite, checkpoint_every=checkpoint_every))
