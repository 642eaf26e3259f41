"""Per-layer, per-expert statistics for users to see where redundancy is before they prune.

`analyze` reuses the observer (one pass, cached like any method's statistics) and writes a
JSON and a CSV table plus one heatmap (layers x experts) per statistic.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from ..methods.cprune_cosine import cluster_affinity
from ..methods.criteria import CRITERIA
from ..methods.mone import access_and_variance

ANALYSIS_STATISTICS = ("selected", "gate_sum", "reap_sum", "output_moments")
COLUMNS = ("frequency", "gate_mass", "output_variance", "reap", "cluster")


def analysis_statistics(probe_tokens: int) -> tuple[str, ...]:
    return (*ANALYSIS_STATISTICS, f"signature_similarity@{probe_tokens}")


def expert_table(stats: dict[int, dict[str, torch.Tensor]], probe_tokens: int, clusters: int = 0) -> dict[int, dict[str, list]]:
    """{layer: {column: [value per expert]}} with the columns in COLUMNS.

    Clusters come from agglomerative clustering of the batch-averaged signature affinity,
    into `clusters` groups (default: half the layer's experts).
    """
    table = {}
    for layer, s in sorted(stats.items()):
        access, variance, _ = access_and_variance(s)
        affinity = s[f"signature_similarity@{probe_tokens}"].mean(0).numpy()
        count = clusters if clusters > 0 else max(1, affinity.shape[0] // 2)
        table[layer] = {
            "frequency": CRITERIA["frequency"].score(s).tolist(),
            "gate_mass": access.tolist(),
            "output_variance": variance.tolist(),
            "reap": CRITERIA["reap"].score(s).tolist(),
            "cluster": cluster_affinity(affinity, min(count, affinity.shape[0])).tolist(),
        }
    return table


def write_analysis(table: dict[int, dict[str, list]], out: Path, title: str) -> list[Path]:
    """Write analysis.json, analysis.csv and heatmap_<column>.png into `out`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "analysis.json", out / "analysis.csv"]
    written[0].write_text(json.dumps({"model": title, "layers": {str(k): v for k, v in table.items()}}, indent=1) + "\n")
    with written[1].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("layer", "expert", *COLUMNS))
        for layer, columns in table.items():
            for expert in range(len(columns["frequency"])):
                writer.writerow((layer, expert, *(columns[c][expert] for c in COLUMNS)))
    layers = list(table)
    width = max(len(table[layer]["frequency"]) for layer in layers)
    for column in COLUMNS:
        grid = torch.full((len(layers), width), float("nan"))
        for row, layer in enumerate(layers):
            values = torch.tensor(table[layer][column], dtype=torch.float32)
            grid[row, : values.numel()] = values
        figure, axes = plt.subplots(figsize=(min(16, 2 + width * 0.35), 1.5 + len(layers) * 0.4))
        image = axes.imshow(grid.numpy(), aspect="auto", cmap="tab20" if column == "cluster" else "viridis", interpolation="nearest")
        axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        axes.set_xlabel("expert")
        axes.set_ylabel("MoE layer")
        axes.set_title(f"{title}: {column.replace('_', ' ')}")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        path = out / f"heatmap_{column}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written
