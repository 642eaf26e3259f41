"""One stage as a command (`moe-compress prune|drop|condense|finetune|slim|quantize`): the same
steps for every stage, so a command is only its options and one call to `run_stage`.

Check what needs no model (the stage's `check_options`, counts, files), then either the dry run
or the run: a stage whose call streams runs on the model opened here (`single.run_single`:
checked against its structure, measured before and after, guarded); the others run from the
checkpoint path (`Stage.run_one`) and are guarded after. What comes back is the report's blocks.

Importing this costs nothing (no torch): the command line declares its options from the
settings below.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .evaluate.protocol import DEFAULT_PROTOCOL, EvalProtocol
from .described import described
from .errors import param
from .loading import LoadSettings

if TYPE_CHECKING:
    from rich.table import Table

    from .data.batches import CalibrationSpec
    from .single import GuardRequest, SingleRun
    from .stages.base import Stage

#: what the compression report says was done, per stage that applies a plan
VERBS = {"prune": "pruned", "drop": "dropped", "condense": "condensed"}


@dataclass(frozen=True)
class CalibrationSettings:
    """The calibration text a command reads (`data.batches.CalibrationSpec`'s fields, as its options name them)."""

    calib: str = described("bundled", "Calibration text: a file (.txt/.jsonl/.parquet), a directory, 'bundled[:domain]' or 'hf:<dataset>'.")
    samples: int = described(64, "Number of calibration sequences.")
    seq_len: int = described(256, "Tokens per calibration sequence.")
    seed: int = described(0, "Seed that picks the calibration sequences.")
    batch_size: int = described(8, "Sequences per forward pass.")
    text_field: str = described("text", "Field/column holding the text in .jsonl/.parquet/datasets.")

    def spec(self, validate: bool = True) -> CalibrationSpec:
        """The `CalibrationSpec`, validated (unless it is not used): a bad value fails before any model is loaded."""
        from .data.batches import CalibrationSpec

        spec = CalibrationSpec(self.calib, self.samples, self.seq_len, self.seed, self.batch_size, self.text_field)
        if validate:
            spec.validate()
        return spec


@dataclass(frozen=True)
class EvalSettings:
    """Perplexity before and after (`eval_ppl`: text sources; None: not measured) with its protocol."""

    eval_ppl: str | None = described(None, (
        f"Measure perplexity on this text before and after (same forms as {param('calib')}; 'bundled': each bundled domain's test "
        f"split), with the evaluation protocol of {param('eval_windows')} / {param('eval_seq_len')}."))
    eval_windows: int = described(DEFAULT_PROTOCOL.windows, (
        f"Perplexity windows per text source for {param('eval_ppl')} (the evaluation protocol; see the eval command's help)."))
    eval_seq_len: int = described(DEFAULT_PROTOCOL.seq_len, f"Tokens per perplexity window for {param('eval_ppl')} (independent of the calibration {param('seq_len')}).")

    def protocol(self) -> EvalProtocol:
        return EvalProtocol(self.eval_windows, self.eval_seq_len).validate()


@dataclass(frozen=True)
class GuardSettings:
    """The quality guard after a command (`single.GuardRequest`): its threshold if set, off, or passing unreached experts."""

    guard_min_top1: float | None = described(None, (
        "The quality guard compares the saved output with the input on held-out calibration text and exits 2 (the output kept, "
        "its card marked FAILED, the worst layer named) when top-1 agreement falls below this; default 0.9 after quantize, 0.25"
        " after the others."))
    no_guard: bool = described(False, "Skip the quality guard (it reads the input and the output once more).")
    allow_unreached: bool = described(False, (
        "Pass the quality guard even when the stage recorded experts that no calibration token reached (and so treated them "
        "without data); they are still named in the card."))

    def request(self, stage: str, text: Any, routes_all: bool = False, batch_size: int | None = None) -> GuardRequest | None:
        """The guard for `stage`, reading `text`'s held-out windows (None with no_guard); `routes_all`: the stage
        takes `calibrate_all_experts`, which a failure for unreached experts then offers; `batch_size`: windows per
        forward, the run's (None: the command has no calibration batch size, the guard's default)."""
        from .single import GuardRequest

        if self.no_guard:
            return None
        request = GuardRequest(stage, text, self.guard_min_top1, self.allow_unreached, routes_all)
        return request if batch_size is None else replace(request, batch_size=batch_size)


def build_stage(kind: str, options: dict[str, Any], planned: bool = False) -> Stage:
    """The stage of `kind` from the options a command was given (those that differ from the defaults, so its
    `describe()` leaves the defaults unsaid), each value checked first; `planned`: a saved plan decides."""
    from .errors import require_positive
    from .libraries import import_model_libraries
    from .stages.registry import stage_class

    import_model_libraries()  # the stages' modules import them: the first step of a stage command that is not light
    kind_class = stage_class(kind)
    values = {**kind_class.defaults(), **options}
    kind_class.check_options(values, planned)
    require_positive(**{name: values[name] for name in kind_class.positive})
    return kind_class(**options)


def run_stage(
    stage: Stage, model: str, out: Path, calib: CalibrationSpec | None, load: LoadSettings = LoadSettings(), guard: GuardSettings = GuardSettings(),
    evaluation: EvalSettings = EvalSettings(), *, overwrite: bool = False, plan_in: Path | None = None, ignore_plan_identity: bool = False,
    plan_out: Path | None = None, cache_dir: Path | None = None, no_cache: bool = False, dry_run: bool = False, **extra: Any,
) -> list[Table | str]:
    """Run `stage` alone on `model`, writing `out`, and return the report's blocks ([] after a dry run, which prints
    its own, and on a rank other than 0 of a distributed run). `plan_in` (prune): apply this plan, no calibration;
    `cache_dir`: the statistics cache for a stage without such an option of its own (`no_cache`: none); `extra`: further
    arguments of the stage's call (finetune's checkpoint_every)."""
    from .dry_run import dry_run_stages
    from .inputs import directory_option, writable_file

    protocol = evaluation.protocol()
    writable_file(plan_out, "plan_out")
    directory_option(cache_dir)
    load.check(model)
    if dry_run:
        dry_run_stages(stage.kind, model, out, overwrite, [stage], load, calib, evaluation.eval_ppl, protocol, plan_in, ignore_plan_identity)
        return []
    if plan_in is not None:
        extra.update(plan=plan_in, ignore_plan_identity=ignore_plan_identity)
    if (cache_dir is not None or no_cache) and "cache_dir" not in type(stage).model_fields:
        extra["cache_dir"] = False if no_cache else cache_dir
    job = _job(calib, out, overwrite, load, extra)
    request = guard.request(stage.kind, stage.guard_text(calib), stage.routes_all_experts, None if calib is None else calib.batch_size)
    run = _streamed(stage, model, job, load, evaluation.eval_ppl, protocol, plan_in, request) if stage.streams else _from_path(stage, model, job, load, request)
    return [] if run is None else report(stage, run, model, out, plan_out, protocol)


def _job(calib: CalibrationSpec | None, out: Path, overwrite: bool, load: LoadSettings, extra: dict[str, Any]):
    from .stages.base import Job

    return Job(calib, out, overwrite, load.device, load.dtype, load.trust_remote_code, load.mode(), extra)


def _streamed(stage: Stage, model: str, job, load: LoadSettings, eval_ppl: str | None, protocol: EvalProtocol, plan_in: Path | None,
              request: GuardRequest | None) -> SingleRun | None:
    """On the model opened here (in memory or streamed), checked against its structure unless a plan decides."""
    from .evaluate.compression import measure_uniform
    from .single import run_single

    check = None if plan_in is not None else (lambda structure: stage.check(structure, []))
    both_plans = measure_uniform if getattr(stage, "uniform", False) else None  # prune --uniform: both plans against the original
    return run_single(lambda weights, tokenizer, device: stage.run_one(weights, tokenizer, replace(job, device=device)), model, job.out,
                      job.overwrite, load, check, eval_ppl, protocol, inputs=(plan_in,), against_original=both_plans, guard=request)


def _from_path(stage: Stage, model: str, job, load: LoadSettings, request: GuardRequest | None) -> SingleRun:
    """From the checkpoint path: the stage opens it as its call does (whole, or streamed by quantize's)."""
    from .sink.save import check_output_dir
    from .single import SingleRun

    stage.before_loading(model, job)
    check_output_dir(job.out, job.overwrite, [model])
    with load.session():
        result = stage.run_one(model, None, job)
        checked = None if request is None else request.check(model, job.out, load.device, load.mode())
    return SingleRun(result, {}, {}, checked)


def report(stage: Stage, run: SingleRun, model: str, out: Path, plan_out: Path | None, protocol: EvalProtocol) -> list[Table | str]:
    """The blocks a command prints after its stage ran: what the stage reports, then the guard's line."""
    from .evaluate.guard import guard_line
    from .report.compression import compression_report, quantization_report, saved_lines, search_line, sparsity_report, uniform_report
    from .report.tables import finetune_table
    from .slimming.observe import check_targets

    result = run.result
    if stage.kind == "quantize":
        blocks = quantization_report(result.summary, out)
    elif stage.kind == "finetune":
        blocks = [finetune_table(result, stage.eval_data), f"time {result['seconds']}s", *saved_lines(out)]
    elif stage.kind == "slim":
        blocks = sparsity_report(result, stage.method, list(check_targets(stage.targets)), model, out, protocol, run.before, run.after)
    else:
        blocks = [*([search_line(result.plan.meta)] if stage.kind == "condense" else []),
                  *compression_report(result, VERBS.get(stage.kind, "compressed"), model, out, plan_out, protocol, run.before, run.after)]
    uniform = uniform_report(result.summary["uniform"], model, out) if getattr(stage, "uniform", False) else []
    return [*blocks, guard_line(run.guard), *uniform]
