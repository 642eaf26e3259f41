"""`--dry-run`: check a command's inputs against the model's structure and say what it would do.

Nothing is calibrated, evaluated or written -- not even the output's parent directory or lock
file. The model is opened as a skeleton (config and shard headers; see `preflight.skeleton`),
so a dry run of a 1 TB checkpoint costs seconds. With `--plan-in` the plan itself is printed,
checked against the model, with the size it would give; otherwise the calibration, the method
and what it can already tell (how many experts each layer keeps under a layer budget).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from rich.table import Table

from .data.batches import CalibrationSpec
from .evaluate.protocol import EvalProtocol, expand_sources
from .arch.size import model_size
from .sink.publish import validate_output_dir
from .preflight import Structure, check_condense, check_drop, check_prune, check_slim, skeleton
from .progress import say as _say
from .progress import show_table
from .stages.base import Stage
from .stages.footprint import footprints
from .stages.prune import Prune
from .stages.quantize import Quantize
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


def _calibration(spec: CalibrationSpec, purpose: str) -> None:
    _say(f"would calibrate on {spec.samples} sequences x {spec.seq_len} tokens of {spec.source} (seed {spec.seed}) to {purpose}")


def _evaluation(eval_ppl: str | None, protocol: EvalProtocol) -> None:
    if eval_ppl:
        _say(f"would measure perplexity before and after on {', '.join(expand_sources(eval_ppl))}; {protocol.describe()}")


def _size_table(before, after) -> Table:
    table = Table(title="size the plan gives")
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="right" if column else "left")
    for label, key, show in (("parameters", "total", human_count), ("active params/token", "active_per_token", human_count), ("bytes in memory", "bytes", human_bytes)):
        first, last = getattr(before, key), getattr(after, key)
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
    show_table(_size_table(model_size(structure.model, structure.adapter), model_size(shaped, structure.adapter)))
    _say("the plan decides: no calibration would run")


def _predicted(model: str, stage: Stage, trust_remote_code: bool) -> None:
    """The weight bytes the stage's `predict` gives (config and shard headers), when the checkpoint's sizes can be read."""
    chain = footprints(model, [stage], trust_remote_code)
    if chain is not None:
        before, after = chain
        _say(f"predicted weights: {human_bytes(before.bytes)} -> {human_bytes(after.bytes)} ({after.bytes:,} bytes"
             f"{'' if after.exact else ', an estimate: which layers lose what is decided from the statistics'})")


def dry_run_prune(
    model: str, out: Path, overwrite: bool, plan_in: Path | None, method: str, options: dict[str, Any], ratio: float, budget: str,
    min_keep: int, spec: CalibrationSpec, eval_ppl: str | None, protocol: EvalProtocol, dtype: str, trust_remote_code: bool,
    ignore_plan_identity: bool = False,
    uniform: bool = False,
) -> None:
    structure = _open(model, out, overwrite, [plan_in], dtype, trust_remote_code, "prune")
    if plan_in is not None:
        _plan_in(structure, plan_in, ignore_plan_identity)
    else:
        kept = check_prune(structure, method, options, ratio, budget, min_keep, uniform)
        _calibration(spec, f"score experts with {method} (statistics are reused from the cache when this model and data were seen)")
        shown = ", ".join(f"{k}={v}" for k, v in options.items())
        _say(f"would remove {ratio:.0%} of the routed experts with {method}{f' ({shown})' if shown else ''}, {budget} budget")
        if kept is not None:
            counts = sorted(set(kept.values()))
            _say(f"every MoE layer would keep {'/'.join(map(str, counts))} of {'/'.join(map(str, sorted(set(structure.experts.values()))))} experts")
        elif uniform:
            _say("every MoE layer would keep the same count: the global plan's total (decided from the statistics) shared equally")
        else:
            _say(f"layers would keep different counts, decided from the statistics (each at least {max(structure.top_k, min_keep)})")
        _predicted(model, Prune(method, ratio=ratio, budget=budget, min_keep=min_keep, uniform=uniform, **options), trust_remote_code)
    _evaluation(eval_ppl, protocol)
    _say(NOTHING_DONE)


def dry_run_drop(
    model: str, out: Path, overwrite: bool, unit: str, n: int | None, target_ratio: float | None, mode: str, spec: CalibrationSpec,
    dtype: str, trust_remote_code: bool,
) -> None:
    structure = _open(model, out, overwrite, [], dtype, trust_remote_code, "drop")
    check_drop(structure, unit, n, target_ratio)
    what = "MoE sub-layers (attention stays)" if unit == "moe" else f"decoder blocks ({mode})"
    _calibration(spec, "score how little each unit changes the residual stream")
    _say(f"would drop {n if n is not None else f'enough {what} to remove {target_ratio:.0%} of the parameters'}" + (f" {what}" if n is not None else ""))
    _say(NOTHING_DONE)


def dry_run_condense(
    model: str, out: Path, overwrite: bool, layers: int, experts: int | None, choose_size: bool, spec: CalibrationSpec,
    dtype: str, trust_remote_code: bool,
) -> None:
    structure = _open(model, out, overwrite, [], dtype, trust_remote_code, "condense")
    check_condense(structure, layers, experts)
    size = experts if experts is not None else structure.top_k
    _calibration(spec, "search, per MoE layer, the experts whose constant-weight sum keeps its output closest (CD-MoE)")
    _say(f"would condense {layers} of {len(structure.experts)} MoE layers, each keeping {'at most' if choose_size else 'exactly'} {size} routed experts")
    _say(NOTHING_DONE)


def dry_run_slim(
    model: str, out: Path, overwrite: bool, method: str, spec, targets: tuple[str, ...], calibration: CalibrationSpec,
    eval_ppl: str | None, protocol: EvalProtocol, dtype: str, trust_remote_code: bool,
) -> None:
    from .slimming.observe import layer_collector

    structure = _open(model, out, overwrite, [], dtype, trust_remote_code, "slim")
    check_slim(structure, targets)
    counts: dict[str, list[int]] = {}
    for index, layer in enumerate(structure.adapter.decoder_layers(structure.model)):
        for matrix in layer_collector(structure.adapter, layer, index, targets, None).matrices:
            entry = counts.setdefault(matrix.kind, [0, 0])
            entry[0] += 1
            entry[1] += matrix.read().numel()  # shapes only: the skeleton holds no values
    if method != "magnitude":
        _calibration(calibration, f"collect each matrix's input statistics for {method}, one layer at a time")
    for kind, (matrices, weights) in sorted(counts.items()):
        _say(f"would zero {spec.describe()} of {kind}: {matrices} matrices, {human_count(weights)} weights, with {method}")
    _evaluation(eval_ppl, protocol)
    _say(NOTHING_DONE)


def dry_run_quantize(
    model: str, out: Path, overwrite: bool, bits: int, group_size: int | None, scope: str, symmetric: bool, dtype: str, trust_remote_code: bool,
    method: str = "rtn", spec: CalibrationSpec | None = None,
) -> None:
    from .arch.table import experts_stored_per_expert
    from .slimming.quantize import SCOPES, check_loadable_when_packed

    structure = _open(model, out, overwrite, [], dtype, trust_remote_code, "quantize")
    if getattr(structure.model.config, "quantization_config", None):
        from .errors import MoECompressError

        raise MoECompressError("this model is already quantised; quantise the full-precision model (slim and prune it first).")
    check_loadable_when_packed(structure.model, structure.adapter)
    group = "one scale per output row" if group_size == 0 else f"groups of {group_size}" if group_size else "the largest group of 128/64/32/16/8 dividing every width"
    if method == "autoround":
        _calibration(spec, "tune the rounding of each decoder block with AutoRound")
    rounding = "AutoRound-tuned rounding" if method == "autoround" else "round-to-nearest (no calibration)"
    _say(f"would quantise {SCOPES[scope]} to {bits} bits ({'symmetric' if symmetric else 'asymmetric'}, {group}) by {rounding}, "
         "and write a compressed-tensors pack-quantized checkpoint")
    if not experts_stored_per_expert(structure.model, structure.adapter):
        _say("the family fuses experts on disk: they would be packed one weight per expert, with the generated code that "
             "stacks them back on load (trust_remote_code=True)")
    _predicted(model, Quantize(bits=bits, group_size=group_size, scope=scope, symmetric=symmetric, method=method), trust_remote_code)
    _say(NOTHING_DONE)
