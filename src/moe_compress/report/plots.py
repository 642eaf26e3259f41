"""The plots of `analyze`: one heatmap per statistic, and the expert-similarity matrix of a layer.

Each plot is made to answer one question, and says in its labels what its colours measure:
  * heatmaps (MoE layer x expert): where is a statistic high or low? With `normalize="layer"`
    each layer is divided by its own largest value, so layers of very different scale (output
    norms grow with depth) can be compared by their shape. Experts a plan would remove are
    crossed out, so a plan can be judged against the statistics it was made from.
  * similarity: which experts of a layer compute nearly the same function? The cosine
    similarity of their outputs on shared probe tokens, experts reordered so each cluster is a
    block on the diagonal, outlined; above it, each expert's share of the layer's tokens. A
    bright block holding one busy expert and several idle ones is what pruning or merging
    removes cheaply; a dark, unclustered matrix says every expert is unique.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from .analysis import Analysis

#: column -> (title, colorbar label with units)
LABELS = {
    "frequency": ("routing frequency", "share of the layer's tokens routed to the expert (a layer's values sum to top-k)"),
    "gate_mass": ("gate mass (access frequency a_e)", "mean gate weight the expert receives per token"),
    "output_variance": ("output variance v_e", "||per-dimension std of f_e(x) over routed tokens||_2 (hidden-state units)"),
    "reap": ("REAP saliency", "mean over routed tokens of gate x ||f_e(x)||_2 (hidden-state units)"),
}
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(analysis: Analysis, column: str) -> np.ndarray:
    width = max(len(analysis.columns[layer][column]) for layer in analysis.layers)
    grid = np.full((len(analysis.layers), width), np.nan)
    for row, layer in enumerate(analysis.layers):
        values = np.asarray(analysis.columns[layer][column], dtype=float)
        grid[row, : values.size] = values
    return grid


def _plan_label(analysis: Analysis) -> str:
    plan = analysis.plan
    if plan is None:
        return ""
    parts = [plan.method] + ([f"ratio {plan.ratio}"] if plan.ratio is not None else []) + ([f"{plan.budget} budget"] if plan.budget else [])
    return "removed by " + ", ".join(parts)


def heatmap(analysis: Analysis, column: str, out: Path, normalize: str = "none") -> Path:
    """heatmap_<column>.png: MoE layers x experts, coloured by the statistic, plan removals crossed out."""
    plt = _pyplot()
    grid = _grid(analysis, column)
    title, unit = LABELS[column]
    if normalize == "layer":
        peak = np.nanmax(np.abs(grid), axis=1, keepdims=True)
        grid = grid / np.where(peak > 0, peak, 1)
        unit = "fraction of the layer's largest value"
        title += ", each layer scaled to its maximum"
    layers, width = grid.shape
    figure, axes = plt.subplots(figsize=(min(18, 3.5 + width * 0.32), 2.2 + layers * 0.32))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("lightgrey")
    image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, interpolation="nearest")
    step = max(1, width // 32)
    axes.set_xticks(range(0, width, step))
    axes.set_yticks(range(layers), [str(layer) for layer in analysis.layers])
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_title(f"{analysis.model}: {title}", fontsize=11)
    bar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02)
    bar.set_label(textwrap.fill(unit, 36 + 4 * layers), fontsize=8)
    if column == "frequency" and normalize != "layer":
        uniform = float(np.nanmean(np.nansum(grid, axis=1) / np.sum(~np.isnan(grid), axis=1)))
        bar.ax.axhline(uniform, color="white", linewidth=2)
        bar.ax.text(1.05, uniform, " uniform", transform=bar.ax.get_yaxis_transform(), fontsize=7, va="center")
    if analysis.removed:
        rows = [(row, expert) for row, layer in enumerate(analysis.layers) for expert in analysis.removed.get(layer, ())]
        axes.scatter([e for _, e in rows], [r for r, _ in rows], marker="x", s=40, c="red", linewidths=1.5, label=_plan_label(analysis))
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.4 / max(layers, 1)), fontsize=8, frameon=False)
    figure.tight_layout()
    path = out / f"heatmap_{column}.png"
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def cluster_order(labels: np.ndarray, frequency: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Experts ordered cluster by cluster (largest clusters first, busiest member first), and
    each cluster's [start, end) span in that order."""
    clusters = sorted(np.unique(labels), key=lambda c: (-np.sum(labels == c), int(c)))
    order, spans = [], []
    for cluster in clusters:
        members = np.flatnonzero(labels == cluster)
        members = members[np.argsort(-frequency[members], kind="stable")]
        spans.append((len(order), len(order) + len(members)))
        order += members.tolist()
    return np.asarray(order), spans


def similarity_plot(analysis: Analysis, layer: int, out: Path) -> Path:
    """similarity_layer<L>.png: the layer's expert-similarity matrix with its clusters outlined,
    and above it each expert's routing frequency (plan removals in red)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    matrix = np.asarray(analysis.similarity[layer], dtype=float)
    labels = np.asarray(analysis.columns[layer]["cluster"])
    frequency = np.asarray(analysis.columns[layer]["frequency"], dtype=float)
    order, spans = cluster_order(labels, frequency)
    shown = matrix[np.ix_(order, order)].copy()
    np.fill_diagonal(shown, np.nan)  # always 1: it would swamp the colour range of what matters
    removed = set(analysis.removed.get(layer, ()))
    n = len(order)
    size = min(16, 4 + n * 0.28)
    figure, (top, axes) = plt.subplots(2, 1, figsize=(size + 1.5, size + 1.2), gridspec_kw={"height_ratios": [1, 4], "hspace": 0.04}, sharex=True)
    colours = ["red" if e in removed else "tab:blue" for e in order]
    top.bar(range(n), frequency[order], color=colours, width=0.8)
    top.set_ylabel("routing\nfrequency", fontsize=8)
    top.set_title(
        f"{analysis.model}: layer {layer}, expert similarity ({len(spans)} clusters outlined)"
        + (" -- the most redundant layer" if layer == analysis.most_redundant_layer() else ""),
        fontsize=11,
    )
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("lightgrey")
    image = axes.imshow(np.ma.masked_invalid(shown), cmap=cmap, interpolation="nearest", aspect="auto")
    for start, end in spans:
        axes.add_patch(Rectangle((start - 0.5, start - 0.5), end - start, end - start, fill=False, edgecolor="cyan", linewidth=2))
    step = max(1, n // 48)
    ticks = list(range(0, n, step))
    axes.set_xticks(ticks, [str(order[i]) for i in ticks], rotation=90, fontsize=7)
    axes.set_yticks(ticks, [str(order[i]) for i in ticks], fontsize=7)
    for tick, index in zip(axes.get_xticklabels(), ticks):
        tick.set_color("red" if order[index] in removed else "black")
    for tick, index in zip(axes.get_yticklabels(), ticks):
        tick.set_color("red" if order[index] in removed else "black")
    axes.set_xlabel("expert (grouped by cluster)" + (f"; red: {_plan_label(analysis)}" if removed else ""))
    axes.set_ylabel("expert")
    bar = figure.colorbar(image, ax=[top, axes], fraction=0.04, pad=0.02)
    bar.set_label(textwrap.fill("cosine similarity of the experts' outputs on the same probe tokens (diagonal, always 1, in grey)", 60), fontsize=8)
    path = out / f"similarity_layer{layer}.png"
    figure.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return path
