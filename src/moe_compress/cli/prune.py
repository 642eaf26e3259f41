"""`moe-compress prune`: remove, replace or merge routed experts with a registered method (or a saved plan)."""

from dataclasses import make_dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..inputs import directory_option, writable_file
from .common import show
from .options import (Bundle, CacheDirOpt, Calibration, DryRunOpt, Evaluation, Guard, IgnorePlanIdentityOpt, Loading, ModelArg, OverwriteOpt,
                      PlanOutOpt, command)

#: Per-method flags of earlier releases -> the method option each sets and its type; hidden from --help, accepted for one more release.
OLD_FLAGS = {
    "--fusion": ("fusion", str), "--fusion-weight": ("fusion_weight", float), "--no-novice": ("novices", bool), "--renormalize": ("renormalize", str),
    "--global-scores": ("global_scores", str), "--variance": ("variance", str), "--clusters": ("clusters", int),
    "--global-clusters": ("global_clusters", int), "--cluster-batch": ("batch", int), "--stage1-rate": ("stage1_rate", float),
    "--stage2-rate": ("stage2_rate", float), "--linkage": ("linkage_method", str), "--stage1-share": ("stage1_share", float),
    "--probe-tokens": ("probe_tokens", int), "--max-layer-loss": ("max_layer_loss", float), "--align": ("align", str),
    "--group-size": ("group_size", int), "--protect-super-experts": ("protect_super_experts", bool),
}
_SWITCHES = {"--protect-super-experts": "--protect-super-experts/--no-protect-super-experts"}
OldFlags = make_dataclass("OldFlags", [
    (flag[2:].replace("-", "_"), Annotated[kind | None, typer.Option(_SWITCHES.get(flag, flag), hidden=True)], None) for flag, (_, kind) in OLD_FLAGS.items()
], bases=(Bundle,), frozen=True)


def method_options(method: str, pairs: list[str], old) -> dict:
    """The method's options from the old flags and --option KEY=VALUE, read by the method's own option types."""
    from ..methods.options import read_options

    given = {key: (flag, getattr(old, flag[2:].replace("-", "_"))) for flag, (key, _) in OLD_FLAGS.items()}
    given = {key: (flag, False if flag == "--no-novice" else value) for key, (flag, value) in given.items() if value is not None}
    return read_options(method, given, pairs)


@command(samples=128)
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the pruned checkpoint to (written atomically).")],
    method: Annotated[str, typer.Option(help="Method: frequency, soft_count, gate_sum, ean, reap, mone, cprune, cprune-cosine, or merging: hc-smoe, m-smoe, ream (see `moe-compress methods`).")] = "reap",
    ratio: Annotated[float, typer.Option(help="Fraction of routed experts to remove, in [0, 1).")] = 0.25,
    budget: Annotated[str, typer.Option(help="layer: every MoE layer loses the same share; global: layers compete for one total.")] = "layer",
    option: Annotated[list[str] | None, typer.Option("--option", help=(
        "A method option as KEY=VALUE, repeatable, read as the option's type (e.g. --option fusion=weighted_sum --option "
        "protect_super_experts=false); `moe-compress methods NAME` lists a method's options, defaults and meanings. "
        "The per-method flags of earlier releases (--fusion, --clusters, --renormalize, ...) still set the same options, for one release."))] = None,
    calibration: Calibration = Calibration(),
    min_keep: Annotated[int, typer.Option(help="Global budget only: fewest experts any layer may keep (never below top-k).")] = 0,
    uniform: Annotated[bool, typer.Option("--uniform", help=(
        "Global budget only: round the global plan to the same count in every MoE layer (its total shared equally; which experts "
        "by the same scores), a stock checkpoint serving engines load. The summary and card show both plans; with --eval both are "
        "measured (perplexity, KL against the original; in memory this holds a copy of the original, streamed only the saved one is)."
    ))] = False,
    plan_in: Annotated[Path | None, typer.Option(help="Apply this plan JSON instead of deciding from calibration.")] = None,
    ignore_plan_identity: IgnorePlanIdentityOpt = False,
    plan_out: PlanOutOpt = None,
    evaluation: Evaluation = Evaluation(),
    guard: Guard = Guard(),
    overwrite: OverwriteOpt = False,
    cache_dir: CacheDirOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the statistics cache.")] = False,
    old: OldFlags = OldFlags(),
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Prune, replace or merge routed experts with a registered method (or a saved plan) and save the result."""
    from ..dry_run import dry_run_prune
    from ..evaluate.compression import measure_uniform
    from ..methods.budget import check_ratio
    from ..methods.uniform import check_uniform
    from ..preflight import check_prune
    from ..report.compression import compression_report, uniform_report
    from ..evaluate.guard import guard_line
    from ..single import run_single
    from ..stages.prune import prune as prune_model

    options = method_options(method, option or [], old)
    if plan_in is None:
        check_ratio(ratio)
    if uniform:
        check_uniform(method, budget, plan_in is not None)
    protocol, spec = evaluation.protocol(), calibration.spec()
    writable_file(plan_out, "--plan-out")
    directory_option(cache_dir)
    load.check(model)
    if dry_run:
        return dry_run_prune(model, out, overwrite, plan_in, method, options, ratio, budget, min_keep, spec, evaluation.eval_ppl, protocol,
                             load.dtype, load.trust_remote_code, ignore_plan_identity, uniform)
    stage = partial(prune_model, method=method, ratio=ratio, budget=budget, calib=spec, plan=plan_in, ignore_plan_identity=ignore_plan_identity,
                    out=out, overwrite=overwrite, min_keep=min_keep, options=options, cache_dir=False if no_cache else cache_dir, uniform=uniform)
    check = None if plan_in is not None else lambda structure: check_prune(structure, method, options, ratio, budget, min_keep)
    measure = measure_uniform if uniform else None  # both plans against the original
    run = run_single(stage, model, out, overwrite, load, check, evaluation.eval_ppl, protocol, inputs=(plan_in,), against_original=measure,
                     guard=guard.request("prune", spec))
    if run is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return
    show([*compression_report(run.result, "pruned", model, out, plan_out, protocol, run.before, run.after), guard_line(run.guard)])
    if uniform:
        show(uniform_report(run.result.summary["uniform"], model, out))
