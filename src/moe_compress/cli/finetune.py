"""`moe-compress finetune`: train the condensed layers of a condensed model."""

from pathlib import Path
from typing import Annotated

import typer

from ..errors import MoECompressError
from ..inputs import require_positive
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
    from ..data.batches import check_seed
    from ..finetuning import finetune
    from ..sink.save import check_output_dir
    from ..loading import load_whole
    from ..report.compression import saved_lines
    from ..report.tables import finetune_table
    from ..evaluate.guard import HeldOutText, guard_line

    require_positive(steps=given.steps, batch_size=given.batch_size, seq_len=given.seq_len)
    check_seed(given.seed)
    if given.lr <= 0:
        raise MoECompressError(f"--lr must be a positive number; got {given.lr}.")
    Loading(device=device or "cpu", verify_checksums=verify_checksums).check(model)
    check_output_dir(out, overwrite, [model])
    loaded, tokenizer = load_whole(model, dtype="float32", trust_remote_code=trust_remote_code)
    report = finetune(loaded, tokenizer, **given.stage().settings(), out=out, checkpoint_every=checkpoint_every, overwrite=overwrite, device=device)
    request = guard.request("finetune", HeldOutText(given.eval_data, given.seq_len))  # its training text is no held-out text
    checked = None if request is None else request.check(model, out, report["device"])
    show([finetune_table(report, given.eval_data), f"time {report['seconds']}s", *saved_lines(out), guard_line(checked)])
