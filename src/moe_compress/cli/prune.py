"""`moe-compress prune`: remove, replace or merge routed experts with a registered method (or a saved plan)."""

from dataclasses import make_dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from ..inputs import directory_option, writable_file
from ..stages.options import PruneOptions
from .common import show
from .options import (Bundle, CacheDirOpt, Calibration, DryRunOpt, Evaluation, Guard, IgnorePlanIdentityOpt, Loading, ModelArg, OverwriteOpt,
                      PlanOutOpt, command, stage_options)

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
Options = stage_options(PruneOptions, exclude=("keep", "options"))


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
    given: Options = Options(),
    option: Annotated[list[str] | None, typer.Option("--option", help=(
        "A method option as KEY=VALUE, repeatable, read as the option's type (e.g. --option fusion=weighted_sum --option "
        "protect_super_experts=false); `moe-compress methods NAME` lists a method's options, defaults and meanings. "
        "The per-method flags of earlier releases (--fusion, --clusters, --renormalize, ...) still set the same options, for one release."))] = None,
    calibration: Calibration = Calibration(),
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
    from ..dry_run import dry_run_stages
    from ..evaluate.compression import measure_uniform
    from ..methods.budget import check_ratio
    from ..methods.uniform import check_uniform
    from ..report.compression import compression_report, uniform_report
    from ..evaluate.guard import guard_line
    from ..single import run_single
    from ..stages.prune import prune as prune_model

    options = method_options(given.method, option or [], old)
    if plan_in is None:
        check_ratio(given.ratio)
    if given.uniform:
        check_uniform(given.method, given.budget, plan_in is not None)
    protocol, spec = evaluation.protocol(), calibration.spec()
    writable_file(plan_out, "--plan-out")
    directory_option(cache_dir)
    load.check(model)
    stage = given.stage(**({"options": options} if options else {}))
    if dry_run:
        return dry_run_stages("prune", model, out, overwrite, [stage], load, spec, evaluation.eval_ppl, protocol, plan_in, ignore_plan_identity)
    run = run_single(partial(prune_model, **stage.settings(), calib=spec, plan=plan_in, ignore_plan_identity=ignore_plan_identity, out=out,
                             overwrite=overwrite, cache_dir=False if no_cache else cache_dir),
                     model, out, overwrite, load, None if plan_in is not None else lambda structure: stage.check(structure, []),
                     evaluation.eval_ppl, protocol, inputs=(plan_in,), against_original=measure_uniform if given.uniform else None,  # both plans against the original
                     guard=guard.request("prune", spec))
    if run is None:  # a rank other than 0 of a distributed run: rank 0 reports
        return
    show([*compression_report(run.result, "pruned", model, out, plan_out, protocol, run.before, run.after), guard_line(run.guard)])
    if given.uniform:
        show(uniform_report(run.result.summary["uniform"], model, out))
