"""Everything `moe-compress analyze` writes: the tables, the plots and, on request, the HTML page.

It sits above `analysis`, `plots` and `html` so that those import only downwards (`analysis`
computes, the other two draw what it computed).
"""

from __future__ import annotations

from pathlib import Path

from .analysis import COLUMNS, Analysis, write_tables
from .html import write_report
from .plots import heatmap, similarity_plot


def write_analysis(analysis: Analysis, out: Path, normalize: str = "none", similarity_layers: list[int] | None = None, report: bool = False) -> list[Path]:
    """Tables, one heatmap per statistic, the similarity plot of each chosen layer and, with
    `report`, report.html; returns the paths written."""
    written = write_tables(analysis, out)
    figures = [heatmap(analysis, column, out, normalize) for column in COLUMNS if column != "cluster"]
    for layer in similarity_layers or [analysis.most_redundant_layer()]:
        figures.append(similarity_plot(analysis, layer, out))
    written += figures
    if report:
        written.append(write_report(analysis, figures, out, normalize))
    return written
