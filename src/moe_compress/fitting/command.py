"""The body of `moe-compress fit MODEL --memory 20GB [--target-ratio 0.4] [--context N --batch B] --out DIR [--dry-run] [--sweep]`.

A plain function the CLI wraps (it parses the options and turns `MoECompressError` into exit 2):
`--dry-run` prints the budget's arithmetic and the search space with predicted sizes, and
calibrates nothing; `--sweep` prints the predicted quality-vs-size curve (the solver's front,
from the statistics alone) before the measured points; otherwise the candidates measured, the
best so far as it goes, and the table of what was chosen and written.

The command's own options are declared here (`FitSettings`), beside the code they drive; importing
this costs nothing (no torch): the command line reads them for its --help.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..described import described
from ..errors import MoECompressError, param
from ..loading import LoadSettings
from ..stage_command import CalibrationSettings
from ..text.format import human_bytes
from .accepted import FIT_METHODS


@dataclass(frozen=True)
class FitSettings:
    """What `fit` searches for and where it writes the result: the budget (`memory` or `target_ratio`, the KV cache at
    `context` x `batch` in it), the method that removes or merges experts, and the held-out text the candidates are measured on."""

    out: Path | None = described(None, "Directory to write the chosen model to, with fit_report.{json,md,png,html} (written atomically).")
    memory: str | None = described(None, f"The budget: saved weights (plus the KV cache with {param('context')}), e.g. 20GB, 512MiB, or bytes.")
    target_ratio: float | None = described(None, f"Instead of {param('memory')}: the budget as a fraction of the original weights' bytes.")
    context: int | None = described(None, "Count the KV cache (or recurrent state) at this many tokens in the budget.")
    batch: int = described(1, f"Sequences held at {param('context')} (KV cache x batch).")
    method: str = described("reap", f"The method that chooses which experts each layer's kept count keeps: one of {', '.join(FIT_METHODS)} "
                            "(pruning; mone replaces removed experts by their mean output; hc-smoe, m-smoe, ream merge them).")
    option: list[str] | None = described(None, f"A method option as KEY=VALUE, repeatable, read as the option's type (e.g. {param('method')} "
                                         f"cprune {param('option')} clusters=4), as prune takes it; `moe-compress methods NAME` lists a method's options.")
    sweep: bool = described(False, "Print the predicted quality-vs-size curve (from the statistics alone) before measuring.")
    eval_windows: int = described(32, "Held-out windows per bundled domain the candidates are measured on (each domain's test split).")
    eval_seq_len: int = described(256, "Tokens per held-out window.")


def _print(line: str) -> None:
    print(line, flush=True)


def _print_report(document: str) -> None:
    """fit_report.md to the terminal: drawn (tables, escapes resolved) on a tty; the Markdown itself into a pipe or file,
    where it is meant to be pasted or kept."""
    if not sys.stdout.isatty():
        _print(document)
        return
    from rich.console import Console
    from rich.markdown import Markdown

    Console().print(Markdown(document))


def _space(result) -> list[str]:
    """The budget's arithmetic and the search space, as a dry run prints them."""
    from ..stages.sizes import BITS
    from .choices import PER_EXPERT_BITS, droppable

    counts = {(min(c), max(c), c[1] - c[0] if len(c) > 1 else 1) for c in result.floors.values()}
    lines = [
        f"original weights: {result.original_bytes} bytes ({human_bytes(result.original_bytes)})",
        f"budget: {result.budget} bytes ({human_bytes(result.budget)})"
        + (f", of which KV cache {result.kv_bytes} bytes" if result.kv_bytes else ""),
        f"weights may take: {result.weight_budget} bytes ({human_bytes(result.weight_budget)})",
        f"smallest reachable: {result.smallest_bytes} bytes ({human_bytes(result.smallest_bytes)})",
        f"search space: {len(result.floors)} MoE layers, each keeping "
        + "; ".join(f"{low}..{high} experts (step {step})" for low, high, step in sorted(counts))
        + f", at {' / '.join(map(str, BITS))} bits"
        + (" (or, per layer, the 1, 2, 4, ... kept experts whose rounding error falls most raised to a wider width)" if PER_EXPERT_BITS else "")
        + (", or its whole decoder block dropped" + (" or its routed MoE alone" if any(droppable(result.sizes, layer) for layer in result.sizes.layers) else "")
           + " (one MoE layer left routing)" if len(result.sizes.layers) > 1 else ""),
        "other decoder weights (attention, shared experts, dense MLPs): "
        + (f"{' / '.join(map(str, BITS))} bits" if result.sizes.others else "as stored (the experts' group size does not divide their widths)"),
    ]
    if result.unchanged:
        lines.append("the original fits: it would be written unchanged")
    return lines


def fit_command(model: str, settings: FitSettings = FitSettings(), calibration: CalibrationSettings = CalibrationSettings(samples=128),
                load: LoadSettings = LoadSettings(), overwrite: bool = False, dry_run: bool = False) -> int:
    """Run `fit` as the command does, printing as it goes; returns the exit status (0). Every input is checked first:
    the device and checksums (`load`), then the calibration text's settings, then the rest."""
    from ..libraries import import_model_libraries

    import_model_libraries()  # what follows imports them
    from ..methods.options import read_options
    from .api import fit

    load.check(model)
    calib, streaming = calibration.spec(), load.mode()
    if settings.out is None and not dry_run:
        raise MoECompressError(f"fit writes the model it chooses: give {param('out')} DIR (or {param('dry_run')} to see the search space only).")
    budget = (model, settings.memory, settings.target_ratio, settings.context, settings.batch, calib, settings.out)
    chosen = {"method": settings.method, "method_options": read_options(settings.method, {}, settings.option or [])}
    result = fit(*budget, dry_run=True, **chosen, overwrite=overwrite, trust_remote_code=load.trust_remote_code)
    for line in _space(result):
        _print(line)
    if dry_run:
        return 0
    result = fit(*budget, sweep=settings.sweep, **chosen, windows=settings.eval_windows, seq_len=settings.eval_seq_len,
                 overwrite=overwrite, device=load.device, trust_remote_code=load.trust_remote_code, streaming=streaming,
                 say=lambda line: print(line, file=sys.stderr, flush=True), show=_print)
    report = (Path(result.output_dir) / "fit_report.md") if result.output_dir else None
    if report is not None and report.exists():
        _print_report(report.read_text())
    if result.best is not None:
        _print(f"chosen: {result.best.name}, {result.best.measured.get('written_bytes', result.best.bytes)} bytes, KL {result.best.measured['kl']:.4g}")
    _print(f"written to {result.output_dir}")
    return 0
