"""`moe-compress finetune`: train the condensed layers of a condensed model."""

from pathlib import Path
from typing import Annotated

import typer

from ..errors import MoECompressError
from ..inputs import require_positive
from .common import show
from .options import Guard, Loading, ModelArg, OverwriteOpt, TrustOpt, VerifyOpt, command


@command("finetune")
def finetune_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for the fine-tuned model; checkpoints go to <out>.checkpoints/.")],
    data: Annotated[str, typer.Option(help="Training text (same forms as --calib; 'bundled' uses its calib split).")] = "bundled",
    eval_data: Annotated[str, typer.Option(help="Held-out text for the before/after perplexity ('bundled': valid split).")] = "bundled",
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 200,
    lr: Annotated[float, typer.Option(help="Peak learning rate (the CD-MoE authors' 1e-5, decayed linearly).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for batch sampling.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps (0: only the final model).")] = 0,
    guard: Guard = Guard(),
    overwrite: OverwriteOpt = False,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... (default: a GPU if present).")] = None,
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
) -> None:
    """Fine-tune only the condensed layers' shared and kept experts of a condensed model."""
    from ..data.batches import check_seed
    from ..finetuning import finetune
    from ..sink.save import check_output_dir
    from ..loading import load_whole
    from ..report.compression import saved_lines
    from ..report.tables import finetune_table
    from ..evaluate.guard import HeldOutText, guard_line

    require_positive(steps=steps, batch_size=batch_size, seq_len=seq_len)
    check_seed(seed)
    if lr <= 0:
        raise MoECompressError(f"--lr must be a positive number; got {lr}.")
    Loading(device=device or "cpu", verify_checksums=verify_checksums).check(model)
    check_output_dir(out, overwrite, [model])
    loaded, tokenizer = load_whole(model, dtype="float32", trust_remote_code=trust_remote_code)
    report = finetune(loaded, tokenizer, data, steps, lr, batch_size, seq_len, seed, eval_data, out=out,
                      checkpoint_every=checkpoint_every, overwrite=overwrite, device=device)
    request = guard.request("finetune", HeldOutText(eval_data, seq_len))  # its training text is no held-out text
    checked = None if request is None else request.check(model, out, report["device"])
    show([finetune_table(report, eval_data), f"time {report['seconds']}s", *saved_lines(out), guard_line(checked)])
