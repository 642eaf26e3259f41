"""What `fit` found, as `fit_report.json`, a markdown table and a plot of the front.

The JSON holds the budget's arithmetic, every candidate (allocation, predicted bytes, proxy,
measured KL / top-1 / perplexity / saved bytes, and the held-out windows it was measured on: the
race, `fitting.race`, stops clear losers early), the chosen one, the candidates stopped early, the
predicted front when swept, and the Spearman rank correlation between the proxy and the measured
KL: how far the proxy can be trusted to rank what was not measured. The correlation is taken on
the race's first slice, the windows every candidate was measured on, so that the KLs it ranks
are of the same text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..text.fit_card import FIT_REPORT_FILE, allocation_lines, candidate_lines, spearman_line, versus_line
from ..text.format import human_bytes

if TYPE_CHECKING:
    from .api import FitResult


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks, ties averaged); None under 3 points or a constant side."""
    if len(xs) < 3:
        return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5 if vx and vy else None


def front_lines(front: dict) -> list[str]:
    """The predicted quality-vs-size curve, as `--sweep` prints it before anything is measured."""
    lines = ["predicted quality vs size (proxy: summed relative output error; the solver's front):"]
    for bits, points in front.items():
        lines.append(f"  {bits}-bit experts:")
        lines += [f"    {size:>14} bytes ({human_bytes(size):>10})  proxy {cost:.4g}" for size, cost in points]
    return lines


def versus_single_methods(report: dict) -> dict:
    """The best single method measured (the candidates named "... alone", or an alias so), and whether the chosen
    candidate's KL is strictly lower than every single method's (None: none fits the budget). A single method the
    race stopped was clearly worse than the leader on the windows it saw: beaten; the best is the one of least KL
    among those measured on every window, else on the first slice. A chosen allocation that is a single method beats none."""
    chosen = next((c for c in report["candidates"] if c["name"] == report["chosen"]), None)
    single = [(name, c) for c in report["candidates"] for name in [c["name"], *c["aliases"]] if " alone" in name and "kl" in c]
    if chosen is None or not single:
        return {"strictly_below_single_methods": None, "best_single_method": None}
    full = [(name, c) for name, c in single if c["windows"] == report["held_out_windows"]]
    name, _ = min(full, key=lambda entry: entry[1]["kl"]) if full else min(single, key=lambda entry: entry[1]["first_slice_kl"])
    beaten = all(chosen["kl"] < c["kl"] for _, c in full) and not any(" alone" in n for n in [chosen["name"], *chosen["aliases"]])
    return {"strictly_below_single_methods": beaten, "best_single_method": name}


def report_dict(result: FitResult) -> dict:
    measured = [c for c in result.candidates if c.measured]
    windows = max((c.measured["windows"] for c in measured), default=0)
    report = {
        "original_bytes": result.original_bytes,
        "budget": result.budget,
        "kv_cache_bytes": result.kv_bytes,
        "weight_budget": result.weight_budget,
        "smallest_reachable_bytes": result.smallest_bytes,
        "unchanged": result.unchanged,
        "chosen": result.best.name if result.best else None,
        "candidates": [c.to_dict() for c in result.candidates],
        "held_out_windows": windows,
        "stopped_early": [{"name": c.name, "windows": c.measured["windows"]} for c in measured if c.measured["windows"] < windows],
        "spearman_proxy_vs_kl": spearman([c.proxy for c in measured], [c.measured["first_slice_kl"] for c in measured]),
        "front": {str(bits): points for bits, points in result.front.items()},
    }
    return {**report, **versus_single_methods(report)}


def markdown(report: dict) -> str:
    lines = [
        "# fit report", "",
        f"Budget {human_bytes(report['budget'])} ({report['budget']} bytes); KV cache {report['kv_cache_bytes']} bytes; "
        f"weights may take {report['weight_budget']} bytes of the original's {report['original_bytes']} "
        f"(smallest reachable: {report['smallest_reachable_bytes']}).", "",
    ]
    if report["unchanged"]:
        return "\n".join([*lines, "The original fits: written unchanged.", ""])
    chosen = next((c for c in report["candidates"] if c["name"] == report["chosen"]), None)
    if chosen:
        lines += [f"## Chosen: {chosen['name']}", "", *allocation_lines(chosen), ""]
    lines += ["## Candidates measured", "", *candidate_lines(report), "", spearman_line(report), "", *versus_line(report)]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> Path | None:
    """The predicted front (proxy, right axis) and every measured candidate's KL against bytes, the chosen one
    ringed and the budget drawn; None when matplotlib is missing (the JSON and markdown say the same)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for c in report["candidates"]:
        if "kl" in c:
            axis.scatter(c["bytes"] / 2**20, c["kl"], s=80 if c["name"] == report["chosen"] else 30,
                         edgecolors="black" if c["name"] == report["chosen"] else "none", label=c["name"], zorder=3)
    axis.axvline(report["weight_budget"] / 2**20, color="grey", linestyle="--", label="weight budget")
    axis.set_xlabel("saved weight MiB")
    axis.set_ylabel("held-out KL to the original (nats / token)")
    if report["front"]:
        other = axis.twinx()
        for bits, points in report["front"].items():
            other.plot([b / 2**20 for b, _ in points], [p for _, p in points], linewidth=0.8, alpha=0.6, label=f"predicted front, {bits}-bit")
        other.set_ylabel("proxy (summed relative output error)")
        other.set_yscale("symlog", linthresh=1e-4)
        other.legend(loc="upper center", fontsize=7)
    axis.set_yscale("symlog", linthresh=1e-4)
    axis.legend(fontsize=7, loc="upper right")
    axis.set_title("fit: candidates measured")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(result: FitResult, directory: Path) -> dict:
    """fit_report.json, fit_report.md and fit_report.png into `directory`; returns the report."""
    import json

    report = report_dict(result)
    (directory / FIT_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (directory / "fit_report.md").write_text(markdown(report))
    report["plot"] = str(plot(report, directory / "fit_report.png") or "") or None
    return report
