"""The Markdown table of what a composition of stages (a recipe) measured after every stage."""

from __future__ import annotations


def stage_report_markdown(report: dict) -> str:
    """The table of a composition's report: every stage's size and perplexity (and speed when measured)."""
    sources = list(report["rows"][0]["perplexity"])
    header = ["stage", "params", "bytes (MiB)", *[f"ppl {s}" for s in sources]]
    has_speed = "speed" in report["rows"][0]
    if has_speed:
        header += ["prefill tok/s", "decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        cells = [row["stage"], f"{row['params']:,}", f"{row['bytes'] / 2**20:.2f}", *[f"{row['perplexity'][s]:.3f}" for s in sources]]
        if has_speed:
            cells += [f"{row['speed']['prefill_tokens_per_s']:.0f}", f"{row['speed']['decode_tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"Checkpoint: {report['checkpoint_bytes'] / 2**20:.2f} MiB."]
    if report.get("protocol"):
        notes.append(report["protocol"][0].upper() + report["protocol"][1:] + ".")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"
