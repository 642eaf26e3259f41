"""`--dry-run`: check a command's inputs against the model's structure and say what it would do.

Nothing is calibrated, evaluated or written -- not even the output's parent directory or lock
file. The model is opened as a skeleton (config and shard headers; see `preflight.skeleton`),
so a dry run of a 1 TB checkpoint costs seconds. With `--plan-in` the plan itself is printed,
checked against the model, with the size it would give. Otherwise every command goes the same
way, through its stage (`stages.base.Stage`): checked against the skeleton, what calibration it
would read and why, its description and what its `explain` can already tell (how many experts
each layer keeps under a layer budget), and the parameters and bytes its `predict` gives.
"""

from __future__ import annotations

import copy
from pathlib import Path
from collections.abc import Sequence

from rich.table import Table

from .data.batches import CalibrationSpec
from .evaluate.protocol import DEFAULT_PROTOCOL, EvalProtocol, expand_sources
from .arch.size import model_size
from .loading import LoadSettings
from .sink.publish import validate_output_dir
from .preflight import Structure, skeleton
from .progress import say as _say
from .progress import show_table
from .stages.base import Stage
from .stages.footprint import footprints
from .text.format import human_bytes, human_count, percent_change

NOTHING_DONE = "dry run: nothing was calibrated, evaluated or written."


def _open(model: str, out: Path, overwrite: bool, inputs: list, dtype: str, trust_remote_code: bool, command: str) -> Structure:
    """Check the output (without creating it), open the skeleton, and say what the model is."""
    validate_output_dir(out, overwrite, [model, *inputs])
    structure = skeleton(model, dtype, trust_remote_code)
    counts = sorted(set(structure.experts.values()))
    layers = len(structure.adapter.decoder_layers(structure.model))
    _say(
        f"dry run: {command} {model} ({structure.adapter.model_type}, {layers} layers, {len(structure.experts)} MoE layers of "
        f"{'/'.join(map(str, counts))} routed experts, top-{structure.top_k}) -> {out}"
    )
    return structure


def _size_table(title: str, bytes_label: str, before: tuple[int, int, int], after: tuple[int, int, int]) -> Table:
    """(parameters, parameters active per token, bytes) before and after."""
    table = Table(title=title)
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="right" if column else "left")
    for label, show, first, last in zip(("parameters", "active params/token", bytes_label), (human_count, human_count, human_bytes), before, after):
        table.add_row(label, show(first), show(last), percent_change(last, first))
    return table


def _plan_in(structure: Structure, plan_path: Path, ignore_plan_identity: bool) -> None:
    """Print a plan checked against the model, and the size it would give (applied to a copy of the skeleton)."""
    from .engine.identity import model_identity
    from .plan import Plan
    from .surgery.experts import apply_plan

    plan = Plan.load(plan_path)
    if structure.weights is not None:
        plan.check_identity(model_identity(structure.model, structure.adapter, structure.weights), ignore_plan_identity)
    else:
        plan.check_model(structure.adapter.model_type, structure.experts, len(structure.adapter.decoder_layers(structure.model)), structure.top_k)
    show_table(plan.table())
    shaped = copy.deepcopy(structure.model)
    apply_plan(shaped, plan, structure.adapter)
    sizes = [model_size(m, structure.adapter) for m in (structure.model, shaped)]
    show_table(_size_table("size the plan gives", "bytes in memory", *((s.total, s.active_per_token, s.bytes) for s in sizes)))
    _say("the plan decides: no calibration would run")


def _predicted(model: str, stages: Sequence[Stage], trust_remote_code: bool) -> None:
    """The size the stages' `predict` gives (config and shard headers), when the checkpoint's sizes can be read."""
    chain = footprints(model, stages, trust_remote_code)
    if chain is not None:
        before, after = chain[0], chain[-1]
        show_table(_size_table("predicted size", "saved weight bytes", *((f.params, f.active_params, f.bytes) for f in (before, after))))
        _say(f"predicted weights: {human_bytes(before.bytes)} -> {human_bytes(after.bytes)} ({after.bytes:,} bytes"
             f"{'' if after.exact else ', an estimate: which layers lose what is decided from the statistics'})")


def dry_run_stages(
    command: str, model: str, out: Path, overwrite: bool, stages: Sequence[Stage], load: LoadSettings, calibration: CalibrationSpec | None = None,
    eval_ppl: str | None = None, protocol: EvalProtocol | None = None, plan_in: Path | None = None, ignore_plan_identity: bool = False,
) -> None:
    """A command's dry run: every stage checked against the model's skeleton, described, explained, and the size
    predicted; with `plan_in` (prune) the plan is what would be applied, printed with the size it gives."""
    structure = _open(model, out, overwrite, [plan_in], load.dtype, load.trust_remote_code, command)
    if plan_in is not None:
        _plan_in(structure, plan_in, ignore_plan_identity)
    else:
        for position, stage in enumerate(stages):
            stage.check(structure, stages[:position])
        uses = [use for stage in stages if (use := stage.calibrates())]
        if uses and calibration is not None:
            _say(f"would calibrate on {calibration.samples} sequences x {calibration.seq_len} tokens of {calibration.source} "
                 f"(seed {calibration.seed}) to {'; '.join(uses)}")
        for stage in stages:
            _say(f"would run {stage.describe()}")
            for line in stage.explain(structure):
                _say(line)
        _predicted(model, stages, load.trust_remote_code)
    if eval_ppl:
        _say(f"would measure perplexity before and after on {', '.join(expand_sources(eval_ppl))}; {(protocol or DEFAULT_PROTOCOL).describe()}")
    _say(NOTHING_DONE)
