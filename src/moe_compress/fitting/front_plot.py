"""The front `fit` found, drawn: every measured candidate's quality against its saved bytes.

One marking for every plot of a fit report (`fit_report.png`, and bench/fit.py's grid of
(model, budget) cells), so that a reader learns it once:
  * the search's candidates (the solver's optimum and the front points under the budget) as
    blue circles, the single methods that fit the budget (the criterion alone, 8-bit alone, 4-bit
    alone: the baselines at the same bytes) as orange squares, the chosen one as a large red star;
  * hollow: stopped early by the race (`fitting.race`), its figures from fewer held-out windows
    than the others', so not quite comparable;
  * the weight budget as a dashed vertical line: everything left of it fits.
matplotlib is imported only when a plot is drawn (the CLI starts without it); without it there
is no plot, and the JSON, markdown and HTML say the same in numbers. A fit that will draw one
starts importing it (and loading its fonts: together about a second, 5 % of a fit of a reference
model) in a background thread while it calibrates and measures (`warm_up`).
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..text.fit_card import single_method, stopped_early

#: role -> (marker, colour, legend label, marker area)
ROLES = {
    "search": ("o", "tab:blue", "search candidate", 40),
    "single": ("s", "tab:orange", "single method alone (baseline at the budget)", 40),
    "chosen": ("*", "tab:red", "chosen", 220),
}
#: The marking in words, for the pages that show a plot of the front (`fitting.report_page`, bench/results/fit.md).
MARKS = ("Blue circles: the search's candidates (the solver's optimum and front points under the budget); orange squares: "
         "single methods that fit the budget (the baselines at the same bytes); red star: the chosen one; hollow: stopped early "
         "by the race, its figures from fewer held-out windows than the others'; dashed line: the weight budget.")
#: metric -> axis label
METRICS = {"kl": "held-out KL to the original (nats / token)", "perplexity": "held-out perplexity"}
MIB = 2**20


_warming: list[threading.Thread] = []


def _import_pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _load_fonts() -> None:
    plt = _import_pyplot()
    if plt is not None:
        figure = plt.figure(figsize=(1, 1))
        figure.text(0.5, 0.5, "fit")
        figure.canvas.draw()
        plt.close(figure)


def warm_up() -> None:
    """Import matplotlib and load its fonts in a background thread, so that the plot drawn later does not wait for them
    (the thread mostly runs while the caller's torch operations have released the interpreter). `pyplot` waits for it."""
    if not _warming:
        thread = threading.Thread(target=_load_fonts, name="moe-compress-plot-warm-up", daemon=True)
        _warming.append(thread)
        thread.start()


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None where matplotlib is not installed."""
    for thread in _warming:
        thread.join()
    return _import_pyplot()


def role(candidate: dict, report: dict) -> str:
    if candidate["name"] == report["chosen"]:
        return "chosen"
    return "single" if single_method(candidate) else "search"


def mark(axis, report: dict, metric: str) -> None:
    """Every measured candidate of `report` (`fitting.report.report_dict`) at (saved MiB, `metric`), marked by its role,
    hollow when stopped early, named beside its mark; the weight budget as a vertical line."""
    for c in report["candidates"]:
        if metric not in c:
            continue
        marker, colour, _, size = ROLES[role(c, report)]
        point = (c["bytes"] / MIB, c[metric])
        axis.scatter(*point, marker=marker, s=size, facecolors="none" if stopped_early(c, report) else colour, edgecolors=colour,
                     linewidths=1.4, zorder=3)
        axis.annotate(c["name"] + (f" (= {', '.join(c['aliases'])})" if c["aliases"] else ""), point, xytext=(5, 4), textcoords="offset points", fontsize=6, color="#333")
    axis.axvline(report["weight_budget"] / MIB, color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("saved weight MiB")
    axis.set_ylabel(METRICS[metric])
    axis.margins(x=0.1, y=0.1)  # room for the names beside the marks
    if any(c.get(metric) == 0 for c in report["candidates"]):  # a KL of 0 (nothing changed): linear near 0
        axis.set_yscale("symlog", linthresh=1e-4)
    elif metric == "kl":
        axis.set_yscale("log")
    else:  # perplexities as numbers, a far worse candidate not flattening the rest
        from matplotlib.ticker import ScalarFormatter

        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.yaxis.set_minor_formatter(ScalarFormatter())


def legend_handles(reports: list[dict]) -> list:
    """The legend of `mark`: the roles present in `reports`, the hollow marking when one was stopped early, the budget line;
    for a figure legend below the panels, where it hides no mark."""
    from matplotlib.lines import Line2D

    present = {role(c, r) for r in reports for c in r["candidates"] if "kl" in c}
    handles = [Line2D([], [], marker=marker, color=colour, linestyle="none", markersize=9 if name == "chosen" else 6, label=label)
               for name, (marker, colour, label, _) in ROLES.items() if name in present]
    if any(stopped_early(c, r) for r in reports for c in r["candidates"]):
        handles.append(Line2D([], [], marker="o", color="grey", markerfacecolor="none", linestyle="none",
                              label="hollow: stopped early by the race (measured on fewer windows)"))
    return [*handles, Line2D([], [], color="grey", linestyle="--", linewidth=1, label="weight budget")]


def plot(report: dict, path: Path) -> Path | None:
    """KL and perplexity against bytes, side by side, marked as the module docstring says; on the KL panel the predicted
    front (the proxy, right axis) when swept, on the perplexity panel the original's. None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    figure, (kl, perplexity) = plt.subplots(1, 2, figsize=(12, 4.8))
    mark(kl, report, "kl")
    mark(perplexity, report, "perplexity")
    handles = legend_handles([report])
    original = next((c["original_perplexity"] for c in report["candidates"] if "original_perplexity" in c), None)
    if original is not None:
        handles.append(perplexity.axhline(original, color="black", linestyle=":", linewidth=1, label="the original's perplexity"))
    if report["front"]:
        other = kl.twinx()
        for bits, points in report["front"].items():
            other.plot([b / MIB for b, _ in points], [p for _, p in points], linewidth=0.8, alpha=0.6, label=f"predicted front, {bits}-bit")
        other.set_ylabel("proxy (summed relative output error)")
        other.set_yscale("symlog", linthresh=1e-4)
        other.legend(loc="upper center", fontsize=7)
    kl.set_title("KL against bytes", fontsize=10)
    perplexity.set_title("perplexity against bytes", fontsize=10)
    figure.suptitle("fit: every candidate measured on held-out text", fontsize=11)
    figure.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
