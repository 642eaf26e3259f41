"""The quality guard's result as model-card lines, from its JSON form (`evaluate.guard.GuardReport.to_dict`).

Rendered from the dict rather than the report object so that a card rendered again later, from
the summary saved beside the checkpoint, shows the same table. Imports nothing heavy.
"""

from __future__ import annotations

from .markdown import text


def _experts(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
    return text(shown) if names else "none"


def guard_lines(guard: dict) -> list[str]:
    """A short paragraph and a table: what was checked, the measured values, the thresholds, pass or fail."""
    verdict = "passed" if guard["passed"] else "FAILED"
    lines = [
        f"Quality guard after {text(guard['stage'])}: {verdict}. The stage's output against its input on "
        f"{guard['windows']} held-out calibration windows of {guard['seq_len']} tokens ({guard['tokens']:,} predictions), "
        "teacher-forced.",
        "",
        "| check | measured | threshold | result |",
        "|---|---:|---:|---|",
        f"| top-1 agreement | {guard['top1_agreement']:.4f} | >= {guard['min_top1']:g} | "
        f"{'pass' if guard['top1_agreement'] >= guard['min_top1'] else 'fail'} |",
        f"| KL(input \\|\\| output), nats per token | {guard['kl']:.5f} | - | - |",
    ]
    unreached = guard["unreached_experts"]
    allowed = " (allowed)" if guard["allow_unreached"] and unreached else ""
    lines.append(f"| experts calibration never reached (layer:expert) | {len(unreached)}: {_experts(unreached)} | 0 | "
                 f"{'pass' if not unreached or guard['allow_unreached'] else 'fail'}{allowed} |")
    if guard["worst_layers"]:
        worst = ", ".join(f"{layer}: {error:.3g}" for layer, error in guard["worst_layers"])
        lines.append(f"| worst decoder layers (own output error / its update) | {worst} | - | - |")
    return lines
