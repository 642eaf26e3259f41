"""`moe-compress analyze`: per-layer, per-expert statistics, heatmaps and similarity plots."""

from pathlib import Path
from typing import Annotated

import typer

from ..progress import say
from .options import CacheDirOpt, Calibration, IgnorePlanIdentityOpt, Loading, ModelArg, command


@command(exclude=("text_field",))
def analyze(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for analysis.json, analysis.csv, one heatmap PNG per statistic and the similarity plot(s).")],
    calibration: Calibration = Calibration(),
    clusters: Annotated[int | None, typer.Option(help="Clusters per layer for the cluster-id column and the similarity plot (default: half the experts).")] = None,
    probe_tokens: Annotated[int, typer.Option(help="Tokens per batch in the probe that defines expert signatures.")] = 64,
    normalize: Annotated[str, typer.Option(help="Heatmap colours: none (the statistic's own units, comparable across layers) or layer (each layer divided by its largest value, to compare shapes).")] = "none",
    plan: Annotated[Path | None, typer.Option(help="Mark the experts this plan JSON removes (crossed out in the heatmaps, red in the similarity plot).")] = None,
    ignore_plan_identity: IgnorePlanIdentityOpt = False,
    method: Annotated[str | None, typer.Option(help="Instead of --plan: mark the experts this method would remove at --ratio / --budget, planned from the same statistics (written to plan.json, for prune --plan-in).")] = None,
    ratio: Annotated[float, typer.Option(help="With --method: fraction of routed experts to remove, in [0, 1).")] = 0.25,
    budget: Annotated[str, typer.Option(help="With --method: layer or global.")] = "layer",
    similarity_layers: Annotated[list[int] | None, typer.Option("--similarity-layer", help="MoE layer whose expert-similarity matrix to plot; repeatable (default: the most redundant layer).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Also write report.html: every plot and table on one self-contained page.")] = False,
    cache_dir: CacheDirOpt = None,
    load: Loading = Loading(),
) -> None:
    """Show where the redundancy is: per-layer, per-expert statistics (frequency, gate mass, output
    variance, REAP, cluster) as JSON/CSV, heatmaps and expert-similarity plots, optionally with
    the experts a plan would remove marked, and --report for one HTML page with all of it."""
    from ..analyze import AnalysisSettings, analyze_checkpoint

    settings = AnalysisSettings(out, calibration.spec(validate=False), probe_tokens, clusters, normalize, method, ratio, budget, similarity_layers or [],
                                report, cache_dir)
    written = analyze_checkpoint(model, settings, load, plan, ignore_plan_identity)
    say(f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written))
