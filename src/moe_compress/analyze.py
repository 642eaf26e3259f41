"""`moe-compress analyze` as a function: where the redundancy is in an opened model.

Per layer and expert, the statistics the methods rank by (frequency, gate mass, output variance,
REAP) and a cluster id, written as JSON/CSV with heatmaps and expert-similarity plots; the
experts a given plan, or a method's plan from the same statistics, would remove are marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .described import described
from .errors import MoECompressError, OptionError, param, require_positive
from .loading import LoadSettings

if TYPE_CHECKING:  # importing this module costs no torch: the command line declares its options from it
    from .data.batches import CalibrationSpec
    from .plan import Plan


def _bundled_calibration() -> CalibrationSpec:
    from .data.batches import CalibrationSpec

    return CalibrationSpec()


@dataclass
class AnalysisSettings:
    """What to compute and write. `method` (with `ratio`, `budget`) plans from the observed statistics and
    saves that plan as plan.json; `normalize` is none or layer (heatmap colours)."""

    out: Path
    calibration: CalibrationSpec = field(default_factory=_bundled_calibration)
    probe_tokens: int = described(64, "Tokens per batch in the probe that defines expert signatures.")
    clusters: int | None = described(None, "Clusters per layer for the cluster-id column and the similarity plot (default: half the experts).")
    normalize: str = described("none", (
        "Heatmap colours: none (the statistic's own units, comparable across layers) or layer (each layer divided by its largest "
        "value, to compare shapes)."))
    method: str | None = described(None, (
        f"Instead of {param('plan')}: mark the experts this method would remove at {param('ratio')} / {param('budget')}, planned "
        f"from the same statistics (written to plan.json, to apply with prune's {param('plan_in')})."))
    ratio: float = described(0.25, f"With {param('method')}: fraction of routed experts to remove, in [0, 1).")
    budget: str = described("layer", f"With {param('method')}: layer or global.")
    similarity_layers: list[int] = field(default_factory=list)
    report: bool = described(False, "Also write report.html: every plot and table on one self-contained page.")
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        """Every value is checked when the settings are made, before any model is loaded (the calibration's last)."""
        require_positive(clusters=self.clusters, probe_tokens=self.probe_tokens)
        if self.normalize not in ("none", "layer"):
            raise OptionError("normalize", f"must be none or layer; got {self.normalize!r}.")
        if self.method is not None:
            from .methods import get_method
            from .methods.budget import check_ratio

            get_method(self.method)
            check_ratio(self.ratio)
        self.calibration.validate()


def analyze_checkpoint(model: str, settings: AnalysisSettings, load: LoadSettings = LoadSettings(), plan: Path | None = None,
                       ignore_plan_identity: bool = False) -> list[Path]:
    """Open `model` as `load` says and `analyze` it, marking the experts `plan` (a plan JSON) or `settings.method` removes;
    the paths, the device and the plan are checked before the model is read. Returns the files written."""
    from .inputs import directory_option

    if plan is not None and settings.method is not None:
        raise MoECompressError(f"give {param('plan')} or {param('method')}, not both.")
    directory_option(settings.out, "out")
    directory_option(settings.cache_dir)
    load.check(model)
    from .plan import Plan

    given = Plan.load(plan) if plan is not None else None
    with load.session(load.device) as device:
        loaded, tokenizer, weights = load.open(model, device)
        return analyze(model, loaded, tokenizer, weights, settings, given, ignore_plan_identity, device)


def analyze(name: str, model, tokenizer, weights, settings: AnalysisSettings, plan: Plan | None = None,
            ignore_plan_identity: bool = False, device: str = "cpu") -> list[Path]:
    """Observe `model` (opened by `source.open.open_model`, whose `weights` say where its layers live) and
    write the analysis to `settings.out`; returns the files written."""
    from .engine.identity import model_identity
    from .engine.prepare import calibration_batches
    from .engine.statistics import collect_statistics
    from .arch import get_adapter
    from .methods import PlanRequest, get_method
    from .report.analysis import Analysis, analysis_statistics, expert_table, removed_by
    from .report.outputs import write_analysis

    adapter = get_adapter(model)
    if plan is not None:
        plan.check_identity(model_identity(model, adapter, weights), ignore_plan_identity)
    layers = adapter.moe_layer_indices(model)
    unknown = [layer for layer in settings.similarity_layers if layer not in layers]
    if unknown:
        raise OptionError("similarity_layers", f"{unknown[0]} is not a MoE layer of this model; its MoE layers: {', '.join(map(str, layers))}.")
    method = get_method(settings.method) if settings.method else None
    names = analysis_statistics(settings.probe_tokens) + (method.needs() if method else ())
    batches = calibration_batches(settings.calibration, tokenizer, model.config)
    stats, _ = collect_statistics(model, batches, names, settings.cache_dir, device, weights)
    if method is not None:
        plan = method.make_plan(PlanRequest(adapter, model.config, stats, settings.ratio, settings.budget))
        plan.identity = model_identity(model, adapter, weights)
    columns, similarity = expert_table(stats, settings.probe_tokens, settings.clusters or 0)
    spec = settings.calibration
    described = {"calibration": f"{spec.samples} x {spec.seq_len} tokens of {spec.source} (seed {spec.seed})",
                 "probe tokens": settings.probe_tokens, "clusters per layer": settings.clusters or "half the experts"}
    experts = {layer: len(values["frequency"]) for layer, values in columns.items()}
    analysis = Analysis(Path(str(name)).name, columns, similarity, removed_by(plan, experts) if plan else {}, plan, described)
    written = write_analysis(analysis, settings.out, settings.normalize, settings.similarity_layers or None, settings.report)
    if method is not None:  # the plan the plots show, ready for `prune --plan-in`
        plan.save(settings.out / "plan.json")
        written.append(settings.out / "plan.json")
    return written
