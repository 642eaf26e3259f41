"""The quality guard: after a stage, check its output against its input and refuse a collapse.

A compressed MoE can be broken and still load: a quantisation with a wrong scale, an expert
rounded without ever seeing a token, a prune that removed what every token needed. Nothing in
the checkpoint says so. The guard measures, on held-out calibration windows
(`data.held_out_windows`: windows of the calibration text the stage did not calibrate on),
  * KL(input || output) of the next-token distributions and top-1 agreement, from one forward
    per window and model (`fidelity.compare`), and
  * when top-1 agreement falls below the threshold (or when asked), each decoder layer's own
    error on the input model's hidden states (`layer_error`), so the failure names the layer
    responsible rather than the last one the error reached,
and, from the calibration statistics the stage observed ("selected": tokens routed per expert),
lists the experts calibration never routed a token to: whatever the stage did to them was
decided without data.

It fails (`QualityGuardError`) when top-1 agreement is below `min_top1` or when an expert was
never reached (unless allowed). The defaults come from the bundled reference models, on 32
held-out windows of 256 tokens (bench/results/guard.md, `python bench/guard.py`):
  * quantisation, 0.9: RTN 8-bit agrees with its input on 0.989 of the tokens, RTN 4-bit on
    0.946-0.952 (AutoRound 4-bit 0.958-0.963 in bench/results/slimming.md). One decoder layer
    with its weight scales x 100 falls to 0.04-0.06 (attention o_proj), 0.10-0.18 (every
    expert's down projection) and 0.64-0.81 (the layer's busiest expert alone): all below.
  * every other stage, 0.25: pruning removes capacity by design, so its agreement is far lower
    and spread wide -- REAP at 25 % 0.66 (ref-mixtral) and 0.87 (ref-deepseek), at 50 % 0.47 and
    0.78, and down to 0.30 per test domain for the frequency criterion at 50 %
    (bench/results/pruning.md). 0.9 would refuse ordinary prunes; 0.25 lets them through and
    still refuses the collapses above (0.04-0.18), where most predictions are no longer the input's.
Both are overridable (`min_top1`); the thresholds are on top-1 agreement because it reads the
same on every vocabulary, where a KL in nats does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..errors import MoECompressError, QualityGuardError, named, param
from ..source.load import DEQUANTISABLE, resolve_model
from ..source.open import Streaming, open_model
from ..source.residency import Weights
from .fidelity import FidelityResult, compare
from .layer_error import layer_errors
from ..walk.statistics import unreached_experts

#: Default minimum top-1 agreement per stage kind (see the module docstring for the measurements).
DEFAULT_MIN_TOP1: dict[str, float] = {"quantize": 0.9}
#: ... and for every stage kind not listed.
OTHER_STAGES_MIN_TOP1 = 0.25
#: Held-out windows the guard reads by default: 32 x 256 tokens, about 8 k predictions (a top-1
#: agreement near 0.9 is then known to about +-0.003, one standard error).
DEFAULT_WINDOWS = 32
#: Windows per forward when the run sets no batch size (a command's guard takes its calibration's).
DEFAULT_BATCH_SIZE = 8
#: The options that override the guard, as its error message names them.
THRESHOLD_OPTION = "--guard-min-top1"
UNREACHED_OPTION = param("allow_unreached")
#: ... and the one that gives unreached experts data (`walk.all_experts`), offered after a stage whose class
#: says it takes it (`stages.Stage.routes_all_experts`: this layer does not import the stages, so the caller passes it).
ROUTE_ALL_OPTION = param("calibrate_all_experts")
#: Layers named in a failure and in the card.
WORST_LAYERS = 3

Model = PreTrainedModel | Weights | str | Path


def _open(model: Model, device: str, streaming: Streaming):
    """`open_model`, but a saved output the streamed reader cannot dequantise (a compressed-tensors
    one: what `quantize` writes) is loaded whole by transformers, under "auto" (which would stream it,
    and so refuse it, as it does every pre-quantised checkpoint) and under streaming on (the run's
    setting, which its output cannot follow)."""
    if isinstance(model, str | Path) and streaming is not False:
        config = Path(resolve_model(model)) / "config.json"
        stored = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
        if isinstance(stored, dict) and stored.get("quant_method") not in DEQUANTISABLE:
            streaming = False
    return open_model(model, device, streaming)


def default_min_top1(stage: str) -> float:
    return DEFAULT_MIN_TOP1.get(stage, OTHER_STAGES_MIN_TOP1)


@dataclass(frozen=True)
class GuardReport:
    """What the guard measured after one stage, and whether the stage passes."""

    stage: str
    fidelity: FidelityResult  # the stage's output against its input
    windows: int
    seq_len: int
    min_top1: float
    layer_errors: dict[int, float] | None  # decoder layer -> relative error of its own output; None: not compared
    unreached: tuple[tuple[int, int], ...]  # (layer, expert) that calibration never routed a token to
    allow_unreached: bool = False
    routes_all: bool = False  # the stage takes ROUTE_ALL_OPTION: a failure for unreached experts offers it

    @property
    def top1_passed(self) -> bool:
        return self.fidelity.top1_agreement >= self.min_top1

    @property
    def passed(self) -> bool:
        return self.top1_passed and (self.allow_unreached or not self.unreached)

    def worst_layers(self, count: int = WORST_LAYERS) -> list[tuple[int, float]]:
        """The `count` layers with the largest own error, worst first."""
        return sorted((self.layer_errors or {}).items(), key=lambda item: (-item[1], item[0]))[:count]

    def failure(self) -> str:
        """One line naming every failed check, its threshold, the worst layer and the override; '' when passed."""
        parts = []
        if not self.top1_passed:
            worst = self.worst_layers(1)
            where = (f"; worst layer {worst[0][0]} (its own output off by {worst[0][1]:.3g} of its update)" if worst
                     else "; no layer named (the layers were not compared one to one)")
            parts.append(
                f"top-1 agreement {self.fidelity.top1_agreement:.3f} < {self.min_top1:g} against the stage's input on {self.windows} held-out "
                f"windows (KL {self.fidelity.kl:.4f} nats/token){where}; if the stage may lose that much, lower the threshold with {THRESHOLD_OPTION}"
            )
        if self.unreached and not self.allow_unreached:
            parts.append(
                f"{len(self.unreached)} expert(s) never received a calibration token, so the stage treated them without data "
                f"(layer:expert {format_experts(self.unreached)}); calibrate on more or other text ({param('samples')}, {param('calib')})"
                + (f", route calibration to every expert ({ROUTE_ALL_OPTION})," if self.routes_all else "")
                + f" or allow them with {UNREACHED_OPTION}"
            )
        return f"quality guard failed after {self.stage}: " + "; and ".join(parts) if parts else ""

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise QualityGuardError(self.failure(), self)

    def to_dict(self) -> dict:
        """JSON-able, for the stage's summary (and `text.guard_card.guard_lines`)."""
        return {
            "stage": self.stage,
            "passed": self.passed,
            "kl": self.fidelity.kl,
            "top1_agreement": self.fidelity.top1_agreement,
            "min_top1": self.min_top1,
            "tokens": self.fidelity.tokens,
            "windows": self.windows,
            "seq_len": self.seq_len,
            "layer_errors": None if self.layer_errors is None else {str(k): v for k, v in self.layer_errors.items()},
            "worst_layers": [[layer, error] for layer, error in self.worst_layers()],
            "unreached_experts": [f"{layer}:{expert}" for layer, expert in self.unreached],
            "allow_unreached": self.allow_unreached,
            "failure": named(self.failure()) or None,
        }


def format_experts(pairs: tuple[tuple[int, int], ...] | list[tuple[int, int]], limit: int = 12) -> str:
    """'1:3, 1:7, 4:2' (and 'and N more' past `limit`)."""
    shown = ", ".join(f"{layer}:{expert}" for layer, expert in pairs[:limit])
    return shown + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def guard(
    before: Model,
    after: Model,
    windows: torch.Tensor,
    stage: str = "stage",
    min_top1: float | None = None,
    stats: dict[int, dict[str, torch.Tensor]] | None = None,
    allow_unreached: bool = False,
    unreached: list[tuple[int, int]] | None = None,
    localise: bool | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "cpu",
    streaming: Streaming = "auto",
    raise_on_failure: bool = True,
    routes_all: bool = False,
) -> GuardReport:
    """Check a stage's output `after` against its input `before` on held-out `windows` [n, seq_len].

    Args:
        before, after: in-memory models, open models (`source.open.open_model`'s weights: streamed
            ones are read layer by layer), or checkpoint directories (a saved output is checked
            as saved: reloaded, streamed when `streaming` says so; a compressed-tensors one is
            loaded whole, the streamed reader does not dequantise it).
        windows: token windows the stage did not calibrate on (`data.held_out_windows`).
        stage: the stage kind ("quantize", "prune", ...): names it in messages and picks the default threshold.
        min_top1: fail below this top-1 agreement; None: `default_min_top1(stage)`.
        stats: the statistics the stage observed on its calibration windows (per MoE layer, with
            "selected"); every expert with no token is reported and fails the guard unless
            `allow_unreached`. Pass them for stages that treat each expert by its tokens
            (calibrated rounding, merging); None: not checked.
        unreached: instead of `stats`, the (layer, expert) pairs the stage itself counted as never reached.
        localise: compute each layer's own error (one more forward of both models); None: only when top-1 fails.
        raise_on_failure: raise `QualityGuardError` (it carries the report) when a check fails.
        routes_all: the stage takes `calibrate_all_experts` (its class's `routes_all_experts`): a failure for
            unreached experts offers it.
    """
    min_top1 = default_min_top1(stage) if min_top1 is None else min_top1
    if not 0 <= min_top1 <= 1:
        raise MoECompressError(f"{THRESHOLD_OPTION} must be between 0 and 1; got {min_top1!r}.")
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise MoECompressError(f"the guard needs at least one window of tokens [n, seq_len]; got a tensor of shape {tuple(windows.shape)}.")
    before_model, _, before_weights = _open(before, device, streaming)
    after_model, _, after_weights = _open(after, device, streaming)
    vocab = (before_model.config.get_text_config().vocab_size, after_model.config.get_text_config().vocab_size)
    if vocab[0] != vocab[1]:
        raise MoECompressError(f"the stage changed the vocabulary ({vocab[0]} -> {vocab[1]} tokens), so next-token distributions cannot be compared.")
    fidelity = compare(after_model, before_model, windows, batch_size, after_weights, before_weights, device)[0]
    report = GuardReport(
        stage, fidelity, int(windows.shape[0]), int(windows.shape[1]), min_top1, None,
        tuple(unreached_experts(stats)) if stats is not None else tuple(unreached or ()), allow_unreached, routes_all,
    )
    if localise or (localise is None and not report.top1_passed):
        errors = layer_errors(before_model, after_model, list(windows.split(batch_size)), before_weights, after_weights, device)
        report = replace(report, layer_errors=errors)
    if raise_on_failure:
        report.raise_if_failed()
    return report


@dataclass(frozen=True)
class HeldOutText:
    """Text a stage never read, all of it usable by the guard: e.g. `finetune`'s evaluation split, which
    it keeps apart from its training text (where calibration held-out windows would be windows it trained on)."""

    source: str
    seq_len: int
    split: str = "valid"

    def windows(self, tokenizer, count: int) -> torch.Tensor:
        from ..data.batches import read_windows

        found = read_windows(tokenizer, self.source, self.seq_len, count, self.split)
        if len(found) == 0:
            raise MoECompressError(f"{self.source!r} ({self.split}) has fewer tokens than one window of {self.seq_len}, so none is left to check quality on.")
        return found


def _held_out(tokenizer, text, count: int) -> torch.Tensor:
    """Up to `count` windows the stage did not read: of a `HeldOutText`, or those calibration with a `CalibrationSpec` left out."""
    from ..data.batches import held_out_windows

    return text.windows(tokenizer, count) if isinstance(text, HeldOutText) else held_out_windows(tokenizer, text, count)


def recorded_unreached(output: str | Path) -> list[tuple[int, int]] | None:
    """The experts a saved stage recorded as never reached by its calibration (its summary's
    "unreached_experts", "layer:expert"); None when the stage records none (it does not treat experts by their tokens)."""
    from ..sink.model_card import SUMMARY_FILE

    path = Path(output) / SUMMARY_FILE
    named = json.loads(path.read_text()).get("unreached_experts") if path.is_file() else None
    return None if named is None else [tuple(int(part) for part in pair.split(":")) for pair in named]


def guard_output(source: str | Path, output: str | Path, calibration, stage: str, min_top1: float | None = None, device: str = "cpu",
                 allow_unreached: bool = False, routes_all: bool = False, batch_size: int = DEFAULT_BATCH_SIZE,
                 streaming: Streaming = "auto") -> dict:
    """The guard after a single-stage command: its saved `output` against its `source` checkpoint, on
    held-out text (`calibration`: a `CalibrationSpec`, whose windows calibration did not pick are read --
    `data.held_out_windows` -- or a `HeldOutText`), both read from disk (streamed when large), and the
    experts the stage recorded as unreached (`recorded_unreached`). The result goes into the output's
    summary and card whether it passed or not; a failure then raises `QualityGuardError` (offering
    `calibrate_all_experts` for unreached experts when `routes_all`), `batch_size` windows per forward and
    `streaming` (the run's own settings: a run told to stream is guarded streamed). Without held-out text it is
    skipped, and the card says why."""
    from ..source.load import load_tokenizer
    from ..sink.model_card import record_guard

    try:
        windows = _held_out(load_tokenizer(str(output), False, str(output)), calibration, DEFAULT_WINDOWS)
    except MoECompressError as exc:
        record_guard(output, {"stage": stage, "skipped": str(exc)})
        return {"stage": stage, "skipped": str(exc)}
    report = guard(source, output, windows, stage=stage, min_top1=min_top1, batch_size=batch_size, device=device, streaming=streaming,
                   raise_on_failure=False, unreached=recorded_unreached(output), allow_unreached=allow_unreached, routes_all=routes_all)
    record_guard(output, report.to_dict())
    report.raise_if_failed()
    return report.to_dict()


def guard_line(result: dict | None) -> str:
    """What a command prints after the guard passed or was skipped ('' when it was not asked for)."""
    if result is None:
        return ""
    if "skipped" in result:
        return f"quality guard after {result['stage']}: not run ({result['skipped']})"
    return (f"quality guard after {result['stage']}: passed, top-1 agreement {result['top1_agreement']:.3f} (>= {result['min_top1']:g}), "
            f"KL {result['kl']:.4f} nats/token against the input on {result['windows']} held-out windows")
