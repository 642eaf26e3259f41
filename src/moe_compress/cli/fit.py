"""`moe-compress fit`: the best compression of a model that fits a memory budget."""

from pathlib import Path
from typing import Annotated

import typer

from .options import Calibration, DryRunOpt, Loading, ModelArg, OverwriteOpt, command


@command(exclude=("max_activation_memory", "offload_dir", "text_field"))
def fit(
    model: ModelArg,
    out: Annotated[Path | None, typer.Option(help="Directory to write the chosen model to, with fit_report.{json,md,png,html} (written atomically).")] = None,
    memory: Annotated[str | None, typer.Option(help="The budget: saved weights (plus the KV cache with --context), e.g. 20GB, 512MiB, or bytes.")] = None,
    target_ratio: Annotated[float | None, typer.Option(help="Instead of --memory: the budget as a fraction of the original weights' bytes.")] = None,
    context: Annotated[int | None, typer.Option(help="Count the KV cache (or recurrent state) at this many tokens in the budget.")] = None,
    batch: Annotated[int, typer.Option(help="Sequences held at --context (KV cache x batch).")] = 1,
    method: Annotated[str, typer.Option(help="The expert-pruning criterion the search allocates with (reap, frequency, soft_count, gate_sum, ean).")] = "reap",
    sweep: Annotated[bool, typer.Option("--sweep", help="Print the predicted quality-vs-size curve (from the statistics alone) before measuring.")] = False,
    eval_windows: Annotated[int, typer.Option(help="Held-out windows per bundled domain the candidates are measured on (each domain's test split).")] = 32,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per held-out window.")] = 256,
    calibration: Calibration = Calibration(),
    overwrite: OverwriteOpt = False,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Search expert counts per layer and bit widths per layer for the least KL to the original within a budget, and write the best.

    One calibration pass scores every candidate with layer-local proxies; a knapsack solver
    allocates them under the budget; the optimum, its neighbours on the front and the single
    methods that fit (the criterion alone, 8-bit, 4-bit) are measured end to end on held-out text,
    and the least KL is written with its report.
    """
    from ..fitting.command import fit_command

    load.check(model)
    return fit_command(model, memory, target_ratio, context, batch, out, dry_run, sweep, calibration.spec(), method, overwrite,
                       load.device, load.trust_remote_code, load.mode(), eval_windows, eval_seq_len)
