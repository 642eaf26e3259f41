"""`analyze --report`: one self-contained HTML page with every plot and table of an analysis.

Images are embedded (base64), so the page can be mailed or attached to an issue as one file.
Above the plots, a table per MoE layer says in numbers what the heatmaps show in colour: how
unevenly the layer routes (the busiest expert's share against a uniform share), how alike its
experts are, and how many experts the plan removes; the full per-expert table follows.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .analysis import COLUMNS, Analysis
from .page import document, image, table
from .plots import LABELS


def layer_summary(analysis: Analysis) -> tuple[list[str], list[list[str]]]:
    """Per MoE layer: experts, routing imbalance, expert similarity, clusters, experts the plan removes."""
    header = ["MoE layer", "experts", "busiest expert's share", "uniform share", "idle experts (<10% of uniform)",
              "mean similarity between experts", "clusters"]
    if analysis.plan is not None:
        header.append("removed by the plan")
    rows = []
    for layer in analysis.layers:
        frequency = np.asarray(analysis.columns[layer]["frequency"], dtype=float)
        experts = frequency.size
        uniform = frequency.sum() / max(experts, 1)
        matrix = np.asarray(analysis.similarity[layer], dtype=float)
        off_diagonal = (matrix.sum() - np.trace(matrix)) / max(experts * (experts - 1), 1)
        row = [str(layer), str(experts), f"{frequency.max():.3f}", f"{uniform:.3f}", str(int((frequency < 0.1 * uniform).sum())),
               f"{off_diagonal:.3f}", str(len(set(analysis.columns[layer]["cluster"])))]
        if analysis.plan is not None:
            row.append(str(len(analysis.removed.get(layer, ()))))
        rows.append(row)
    return header, rows


def write_report(analysis: Analysis, figures: list[Path], out: Path, normalize: str = "none") -> Path:
    """report.html in `out`: settings, the per-layer summary, every figure, and the per-expert table."""
    parts = [f"<h1>Expert analysis of {html.escape(analysis.model)}</h1>"]
    settings = ", ".join(f"{k}: {v}" for k, v in analysis.settings.items())
    parts.append(f"<p class='note'>{html.escape(settings)}</p>")
    if analysis.plan is not None:
        plan = analysis.plan
        parts.append(f"<p>Plan: <b>{html.escape(plan.method)}</b>" + (f", ratio {plan.ratio}" if plan.ratio is not None else "")
                     + (f", {html.escape(plan.budget)} budget" if plan.budget else "")
                     + f": removes {sum(len(v) for v in analysis.removed.values())} experts (crossed out / red below).</p>")
    header, rows = layer_summary(analysis)
    parts.append("<h2>Per layer</h2>")
    parts.append("<p class='note'>A busiest share far above the uniform share, or many idle experts, means uneven routing: "
                 "frequency-based pruning has experts to spare there. A high mean similarity means experts compute nearly the same "
                 "function: clusters can be merged or thinned.</p>")
    parts.append(table(header, rows))
    parts.append("<h2>Plots</h2>")
    if normalize == "layer":
        parts.append("<p class='note'>Heatmaps are scaled per layer (each row divided by its largest value).</p>")
    for figure in figures:
        parts.append(f"<h3>{html.escape(figure.stem.replace('_', ' '))}</h3>{image(figure)}")
    parts.append("<h2>Per expert</h2><details><summary>all experts of all layers</summary>")
    expert_rows, removed_rows = [], {}
    for layer in analysis.layers:
        columns = analysis.columns[layer]
        gone = set(analysis.removed.get(layer, ()))
        for expert in range(len(columns["frequency"])):
            if expert in gone:
                removed_rows[len(expert_rows)] = "removed"
            expert_rows.append([str(layer), str(expert), *(f"{columns[c][expert]:.4g}" if c != "cluster" else str(columns[c][expert]) for c in COLUMNS)])
    names = ["layer", "expert", *(LABELS[c][0] if c in LABELS else c for c in COLUMNS)]
    parts.append(table(names, expert_rows, removed_rows) + "</details>")
    path = out / "report.html"
    path.write_text(document(f"moe-compress analysis: {analysis.model}", parts))
    return path
