"""The `eval` table: one row per measurement of the report `evaluate.models.evaluate_models` returns,
with the original's column and the change when it compared two models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from ..text.format import human_bytes, human_count, percent_change

if TYPE_CHECKING:
    from ..evaluate.protocol import EvalProtocol


def eval_table(report: dict, protocol: EvalProtocol) -> list[Table | str]:
    """One row per measurement; with --compare, the original's column and the change. Then the
    lines that qualify it (printed under it, not as a caption: a caption wraps to the table's width),
    the last the perplexity `protocol` where perplexity was measured."""
    original = report.get("original")
    comparison = report.get("comparison") or {}
    table = Table(title=f"evaluation of {report['model']}" + (f" against {original['model']}" if original else ""))
    table.add_column("measure")
    table.add_column(report["model"], justify="right")
    if original:
        table.add_column(original["model"] + " (original)", justify="right")
        table.add_column("change", justify="right")

    def row(label: str, mine: str, theirs: str = "", change: str = "") -> None:
        table.add_row(label, mine, *((theirs, change) if original else ()))

    def pct(r: float | None) -> str:
        return percent_change(r, 1.0) if r is not None else "-"

    def acc(score: dict | None, key: str) -> str:
        if not score or score.get(key) is None:
            return "-"
        err = score.get(f"{key}_stderr")
        return f"{score[key]:.3f}" + (f" ± {err:.3f}" if err is not None else "")

    def points(d: float | None) -> str:
        return f"{100 * d:+.1f} pts" if d is not None else "-"

    theirs = original or {"perplexity": {}, "tasks": {}, "params": {}, "speed": None}
    for source, r in report["perplexity"].items():
        other = theirs["perplexity"].get(source)
        row(f"ppl {source.removeprefix('bundled:')}", f"{r['perplexity']:.3f}", f"{other['perplexity']:.3f}" if other else "", pct(comparison.get("perplexity_ratio", {}).get(source)))
    for source, f in (report.get("fidelity") or {}).items():
        name = source.removeprefix("bundled:")
        row(f"KL to original {name}", f"{f['kl']:.4f}", "0", "")
        row(f"top-1 agreement {name}", f"{f['top1_agreement']:.3f}", "1", "")
    for task, score in report["tasks"].items():
        other = theirs["tasks"].get(task)
        for key in ("acc", "acc_norm"):
            row(f"{key} {task}", acc(score, key), acc(other, key), points(comparison.get(f"{key}_delta", {}).get(task)))
    notes = []
    if report["tasks"]:
        counts = sorted({s["samples"] for s in report["tasks"].values() if s.get("samples") and not s.get("group")})
        notes.append(f"accuracy ± stderr over {'/'.join(map(str, counts))} questions per task; chance is 1/choices (0.25 for moec)")
    for key, label in (("total", "parameters"), ("routed", "routed-expert params"), ("active_per_token", "active params/token")):
        row(label, human_count(report["params"][key]), human_count(theirs["params"][key]) if original else "", pct(comparison.get("params_ratio", {}).get(key)))
    for key, label in (("checkpoint_bytes", "checkpoint bytes"), ("bytes_in_memory", "bytes in memory"), ("peak_rss_bytes", "peak RSS (process)")):
        mine, other = report.get(key), theirs.get(key)
        change = pct(comparison.get("checkpoint_bytes_ratio")) if key == "checkpoint_bytes" else ""
        row(label, human_bytes(mine) if mine is not None else "-", human_bytes(other) if other is not None else "", change)
    if report.get("speed"):
        speed, other = report["speed"], theirs.get("speed") or {}
        ratios = comparison.get("speed") or {}
        for phase in ("prefill", "decode"):
            key = f"{phase}_tokens_per_s"
            ratio = ratios.get(f"{phase}_ratio")
            row(f"{phase} tokens/s", f"{speed[key]:,.1f}", f"{other[key]:,.1f}" if other else "", f"×{ratio:.3f}" if ratio is not None else "")
    return [table, *notes, protocol.describe() if report["settings"]["ppl"] else ""]
