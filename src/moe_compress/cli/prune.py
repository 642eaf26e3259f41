"""`moe-compress prune`: remove, replace or merge routed experts with a registered method (or a saved plan)."""

from dataclasses import make_dataclass
from pathlib import Path
from typing import Annotated

import typer

from ..stages.options import PruneOptions
from .options import STAGE_PARTS, Bundle, IgnorePlanIdentityOpt, stage_command

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
    from ..libraries import import_model_libraries
    import_model_libraries()  # before the methods' modules, which import them
    from ..methods.options import read_options

    given = {key: (flag, getattr(old, flag[2:].replace("-", "_"))) for flag, (key, _) in OLD_FLAGS.items()}
    given = {key: (flag, False if flag == "--no-novice" else value) for key, (flag, value) in given.items() if value is not None}
    return read_options(method, given, pairs)


@stage_command(PruneOptions, out="Directory to write the pruned checkpoint to (written atomically).", omit=("keep", "options"),
               parts=(*STAGE_PARTS, "plan_out", "evaluation", "cache_dir"), samples=128)
def prune(
    given,
    option: Annotated[list[str] | None, typer.Option("--option", help=(
        "A method option as KEY=VALUE, repeatable, read as the option's type (e.g. --option fusion=weighted_sum --option "
        "protect_super_experts=false); `moe-compress methods NAME` lists a method's options, defaults and meanings. "
        "The per-method flags of earlier releases (--fusion, --clusters, --renormalize, ...) still set the same options, for one release."))] = None,
    plan_in: Annotated[Path | None, typer.Option(help="Apply this plan JSON instead of deciding from calibration.")] = None,
    ignore_plan_identity: IgnorePlanIdentityOpt = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the statistics cache.")] = False,
    old: OldFlags = OldFlags(),
):
    """Prune, replace or merge routed experts with a registered method (or a saved plan) and save the result."""
    options = method_options(given.method, option or [], old)
    stage = given.stage(plan_in is not None, **({"options": options} if options else {}))
    return stage, {"plan_in": plan_in, "ignore_plan_identity": ignore_plan_identity, "no_cache": no_cache}
