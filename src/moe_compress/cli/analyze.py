"""`moe-compress analyze`: per-layer, per-expert statistics, heatmaps and similarity plots."""

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from ..analyze import AnalysisSettings
from ..progress import say
from .options import CacheDirOpt, Calibration, IgnorePlanIdentityOpt, Loading, ModelArg, command, settings_options

Options = settings_options(AnalysisSettings, inherit=False)


@command(exclude=("text_field",))
def analyze(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for analysis.json, analysis.csv, one heatmap PNG per statistic and the similarity plot(s).")],
    calibration: Calibration = Calibration(),
    given: Options = Options(),
    plan: Annotated[Path | None, typer.Option(help="Mark the experts this plan JSON removes (crossed out in the heatmaps, red in the similarity plot).")] = None,
    ignore_plan_identity: IgnorePlanIdentityOpt = False,
    similarity_layers: Annotated[list[int] | None, typer.Option("--similarity-layer", help="MoE layer whose expert-similarity matrix to plot; repeatable (default: the most redundant layer).")] = None,
    cache_dir: CacheDirOpt = None,
    load: Loading = Loading(),
) -> None:
    """Show where the redundancy is: per-layer, per-expert statistics (frequency, gate mass, output
    variance, REAP, cluster) as JSON/CSV, heatmaps and expert-similarity plots, optionally with
    the experts a plan would remove marked, and --report for one HTML page with all of it."""
    from ..analyze import analyze_checkpoint

    settings = AnalysisSettings(out, calibration.spec(validate=False), **asdict(given), similarity_layers=similarity_layers or [], cache_dir=cache_dir)
    written = analyze_checkpoint(model, settings, load, plan, ignore_plan_identity)
    say(f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written))
