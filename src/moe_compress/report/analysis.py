"""Per-layer, per-expert statistics for users to see where redundancy is before they prune.

`analyze` reuses the observer (one pass, cached like any method's statistics) and builds an
`Analysis`: per MoE layer and expert, the access frequency, gate mass, output variance, REAP
score and a cluster id; the expert-similarity matrix of the layers to be plotted; and, when a
plan is given (a plan file, or a method and ratio applied to these very statistics), which
experts it would remove. `write_analysis` writes it as JSON and CSV, with the plots of
`report.plots` and, on request, the single HTML page of `report.html`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..methods.cprune_cosine import cluster_affinity
from ..methods.criteria import CRITERIA
from ..methods.mone import access_and_variance
from ..plan import Plan

ANALYSIS_STATISTICS = ("selected", "gate_sum", "reap_sum", "output_moments")
COLUMNS = ("frequency", "gate_mass", "output_variance", "reap", "cluster")


def analysis_statistics(probe_tokens: int) -> tuple[str, ...]:
    return (*ANALYSIS_STATISTICS, f"signature_similarity@{probe_tokens}")


@dataclass
class Analysis:
    """What `analyze` found, ready to be written, plotted and reported."""

    model: str
    columns: dict[int, dict[str, list]]  # layer -> column -> value per expert
    similarity: dict[int, np.ndarray]  # layer -> [E, E] batch-averaged cosine similarity of expert signatures
    removed: dict[int, list[int]] = field(default_factory=dict)  # layer -> experts the plan removes
    plan: Plan | None = None
    settings: dict = field(default_factory=dict)  # calibration, probe, clusters: how it was measured

    @property
    def layers(self) -> list[int]:
        return sorted(self.columns)

    def most_redundant_layer(self) -> int:
        """The layer whose experts are most alike (highest mean off-diagonal similarity): where
        pruning or merging has the most to take."""

        def mean_off_diagonal(matrix: np.ndarray) -> float:
            n = matrix.shape[0]
            return float((matrix.sum() - np.trace(matrix)) / max(n * (n - 1), 1))

        return max(self.layers, key=lambda layer: (mean_off_diagonal(self.similarity[layer]), -layer))


def expert_table(stats: dict[int, dict[str, torch.Tensor]], probe_tokens: int, clusters: int = 0) -> tuple[dict[int, dict[str, list]], dict[int, np.ndarray]]:
    """({layer: {column: [value per expert]}} with the columns in COLUMNS, {layer: similarity matrix}).

    Clusters come from agglomerative clustering of the batch-averaged signature affinity,
    into `clusters` groups (default: half the layer's experts).
    """
    table, similarity = {}, {}
    for layer, s in sorted(stats.items()):
        access, variance, _ = access_and_variance(s)
        affinity = s[f"signature_similarity@{probe_tokens}"].mean(0).numpy()
        count = clusters if clusters > 0 else max(1, affinity.shape[0] // 2)
        similarity[layer] = affinity
        table[layer] = {
            "frequency": CRITERIA["frequency"].score(s).tolist(),
            "gate_mass": access.tolist(),
            "output_variance": variance.tolist(),
            "reap": CRITERIA["reap"].score(s).tolist(),
            "cluster": cluster_affinity(affinity, min(count, affinity.shape[0])).tolist(),
        }
    return table, similarity


def removed_by(plan: Plan, experts: dict[int, int]) -> dict[int, list[int]]:
    """Experts a plan removes per MoE layer (`experts`: layer -> count); a dropped MoE sub-layer or
    decoder block loses all of them."""
    removed = {lp.layer: lp.removed for lp in plan.layers}
    for block in plan.dropped_blocks:
        if block in experts:
            removed[block] = list(range(experts[block]))
    return {layer: ids for layer, ids in sorted(removed.items()) if ids}


def write_tables(analysis: Analysis, out: Path) -> list[Path]:
    """analysis.json and analysis.csv (with a `removed` column when a plan was given)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "analysis.json", out / "analysis.csv"]
    body = {
        "model": analysis.model,
        "settings": analysis.settings,
        "layers": {str(k): v for k, v in analysis.columns.items()},
        "removed": {str(k): v for k, v in analysis.removed.items()} if analysis.plan is not None else None,
        "plan": {"method": analysis.plan.method, "ratio": analysis.plan.ratio, "budget": analysis.plan.budget} if analysis.plan else None,
    }
    written[0].write_text(json.dumps(body, indent=1) + "\n")
    with written[1].open("w", newline="") as handle:
        writer = csv.writer(handle)
        extra = ("removed",) if analysis.plan is not None else ()
        writer.writerow(("layer", "expert", *COLUMNS, *extra))
        for layer, columns in analysis.columns.items():
            gone = set(analysis.removed.get(layer, ()))
            for expert in range(len(columns["frequency"])):
                marks = (int(expert in gone),) if analysis.plan is not None else ()
                writer.writerow((layer, expert, *(columns[c][expert] for c in COLUMNS), *marks))
    return written
