"""What `fit` found, as `fit_report.json`, a markdown table, a plot of the front (`fitting.front_plot`)
and the page that shows them together, `fit_report.html` (`fitting.report_page`).

The JSON holds the budget's arithmetic, each MoE layer's experts in the original, every candidate
(allocation, predicted bytes, proxy, measured KL / top-1 / perplexity / saved bytes, and the
held-out windows it was measured on: the race, `fitting.race`, stops clear losers early), the chosen one,
the candidates stopped early, the predicted front when swept, and the Spearman rank correlation
between the proxy and the measured KL: how far the proxy can be trusted to rank what was not
measured. The correlation is taken on the race's first slice, the windows every candidate was
measured on, so that the KLs it ranks are of the same text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..text.fit_card import FIT_REPORT_FILE, FIT_REPORT_PAGE, allocation_lines, budget_line, candidate_lines, spearman_line, versus_line
from ..text.format import human_bytes
from .front_plot import plot
from .report_page import page

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
        # each MoE layer's experts in the original: the allocation's kept counts are read against them
        "experts": {str(layer): sizes.experts for layer, sizes in result.sizes.layers.items()} if result.sizes else {},
    }
    return {**report, **versus_single_methods(report)}


def markdown(report: dict) -> str:
    lines = ["# fit report", "", budget_line(report), "",
             f"The same as one page, the front plotted (KL and perplexity against bytes): `{FIT_REPORT_PAGE}`.", ""]
    if report["unchanged"]:
        return "\n".join([*lines, "The original fits: written unchanged.", ""])
    chosen = next((c for c in report["candidates"] if c["name"] == report["chosen"]), None)
    if chosen:
        lines += [f"## Chosen: {chosen['name']}", "", *allocation_lines(chosen), ""]
    lines += ["## Candidates measured", "", *candidate_lines(report), "", spearman_line(report), "", *versus_line(report)]
    return "\n".join(lines)


def write_report(result: FitResult, directory: Path) -> dict:
    """fit_report.json, fit_report.md, fit_report.png and fit_report.html into `directory` (the output's staging
    directory: published with the checkpoint, `sink.save.publish`); returns the report."""
    import json

    report = report_dict(result)
    (directory / FIT_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (directory / "fit_report.md").write_text(markdown(report))
    figure = plot(report, directory / "fit_report.png")
    (directory / FIT_REPORT_PAGE).write_text(page(report, figure))
    report["plot"] = str(figure) if figure else None
    return report
