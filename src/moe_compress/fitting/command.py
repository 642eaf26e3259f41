"""The body of `moe-compress fit MODEL --memory 20GB [--target-ratio 0.4] [--context N --batch B] --out DIR [--dry-run] [--sweep]`.

A plain function the CLI wraps (it parses the options and turns `MoECompressError` into exit 2):
`--dry-run` prints the budget's arithmetic and the search space with predicted sizes, and
calibrates nothing; `--sweep` prints the predicted quality-vs-size curve (the solver's front,
from the statistics alone) before the measured points; otherwise the candidates measured, the
best so far as it goes, and the table of what was chosen and written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data.batches import CalibrationSpec
from ..errors import MoECompressError, param
from ..text.format import human_bytes


def _print(line: str) -> None:
    print(line, flush=True)


def _space(result) -> list[str]:
    """The budget's arithmetic and the search space, as a dry run prints them."""
    from ..stages.sizes import BITS
    from .search import droppable

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
        + (", or its routed MoE dropped (one MoE layer left routing)" if any(droppable(result.sizes, layer) for layer in result.sizes.layers) else ""),
        "other decoder weights (attention, shared experts, dense MLPs): "
        + (f"{' / '.join(map(str, BITS))} bits" if result.sizes.others else "as stored (the experts' group size does not divide their widths)"),
    ]
    if result.unchanged:
        lines.append("the original fits: it would be written unchanged")
    return lines


def fit_command(
    model: str,
    memory: str | None = None,
    target_ratio: float | None = None,
    context: int | None = None,
    batch: int = 1,
    out: str | Path | None = None,
    dry_run: bool = False,
    sweep: bool = False,
    calib: CalibrationSpec | str = CalibrationSpec(samples=128),
    method: str = "reap",
    overwrite: bool = False,
    device: str = "cpu",
    trust_remote_code: bool = False,
    streaming: bool | str = "auto",
    windows: int = 32,
    seq_len: int = 256,
) -> int:
    """Run `fit` as the command does, printing as it goes; returns the exit status (0). `windows` x `seq_len`: the held-out
    text per bundled domain; `streaming`: as `source.open.open_model` takes it."""
    from .api import fit

    if out is None and not dry_run:
        raise MoECompressError(f"fit writes the model it chooses: give {param('out')} DIR (or {param('dry_run')} to see the search space only).")
    result = fit(model, memory, target_ratio, context, batch, calib, out, dry_run=True, method=method, overwrite=overwrite,
                 trust_remote_code=trust_remote_code)
    for line in _space(result):
        _print(line)
    if dry_run:
        return 0
    result = fit(model, memory, target_ratio, context, batch, calib, out, sweep=sweep, method=method, windows=windows, seq_len=seq_len,
                 overwrite=overwrite, device=device, trust_remote_code=trust_remote_code, streaming=streaming, say=lambda line: print(line, file=sys.stderr, flush=True), show=_print)
    report = (Path(result.output_dir) / "fit_report.md") if result.output_dir else None
    if report is not None and report.exists():
        _print(report.read_text())
    if result.best is not None:
        _print(f"chosen: {result.best.name}, {result.best.measured.get('written_bytes', result.best.bytes)} bytes, KL {result.best.measured['kl']:.4g}")
    _print(f"written to {result.output_dir}")
    return 0
