"""One compression stage run on one model, start to end, as the prune, drop and slim commands run it.

Open the model (in memory or streamed), check the stage against its structure, measure the
perplexity before, compress and save, measure after. The commands differ only in the stage
call and its check; the order of the steps is the same for all of them, and so is what
`--eval` measures (the evaluation protocol, `evaluate.compression`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import distributed
from .data.batches import CalibrationSpec
from .evaluate.compression import eval_sets, perplexities, perplexities_after
from .evaluate.guard import DEFAULT_BATCH_SIZE, HeldOutText, guard_output
from .evaluate.protocol import DEFAULT_PROTOCOL, EvalProtocol
from .sink.save import check_output_dir
from .loading import LoadSettings
from .preflight import Structure


@dataclass(frozen=True)
class GuardRequest:
    """The quality guard after a command: the stage kind (its default threshold), the text it reads (a
    `CalibrationSpec`: the windows calibration did not pick; or an `evaluate.guard.HeldOutText`), the
    threshold if the user set one, whether experts calibration never reached are allowed, whether the
    stage takes `calibrate_all_experts` (its class's `routes_all_experts`: a failure then offers it), and the
    windows per forward (the run's calibration batch size: the memory the user allowed for one batch)."""

    stage: str
    calibration: CalibrationSpec | HeldOutText
    min_top1: float | None = None
    allow_unreached: bool = False
    routes_all: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE

    def check(self, source: str | Path, output: str | Path, device: str, streaming: bool | str = "auto") -> dict:
        """`evaluate.guard.guard_output` of `output` against `source`, as requested, both read as the run's `streaming` says."""
        return guard_output(source, output, self.calibration, self.stage, self.min_top1, device, self.allow_unreached, self.routes_all,
                            self.batch_size, streaming)


@dataclass
class SingleRun:
    """What a stage returned, with the perplexity per evaluation source before and after it ({}: not measured)."""

    result: Any
    before: dict[str, float]
    after: dict[str, float]
    guard: dict | None = None  # the quality guard's result (`evaluate.guard.guard_output`); None: not run


def run_single(
    stage: Callable[..., Any],
    model: str,
    out: Path,
    overwrite: bool,
    load: LoadSettings,
    check: Callable[[Structure], Any] | None = None,
    eval_ppl: str | None = None,
    protocol: EvalProtocol = DEFAULT_PROTOCOL,
    inputs: tuple[Path | None, ...] = (),
    against_original: Callable[..., None] | None = None,
    guard: GuardRequest | None = None,
) -> SingleRun | None:
    """Run `stage(weights, tokenizer=..., device=...)` (a single-stage call such as `stages.prune.prune`
    with its options bound, writing to `out`) on `model`; None on a rank other than 0 of a distributed
    run (rank 0 reports).

    `check` refuses, from the opened model's structure, what cannot succeed: before calibration
    and evaluation. `inputs` are other files the run reads (a plan), which `out` must not replace.
    `against_original(result, original, original_weights, windows, after, device)` measures the
    result against the unchanged model when there is text to measure on (prune's uniform rounding);
    an in-memory model is changed in place, so it then gets a copy made before the stage runs.
    `guard`: the quality guard then compares the saved output with `model` on held-out calibration text
    (a failure, recorded in the output's card, raises `QualityGuardError`).
    """
    check_output_dir(out, overwrite, [model, *inputs])
    with load.session(load.device) as device:
        loaded, tokenizer, weights = load.open(model, device)
        if check is not None:
            check(Structure.of(loaded))
        windows = eval_sets(protocol, eval_ppl, tokenizer, loaded.config)
        before = perplexities(loaded, windows, weights, device, "before")
        keeps_copy = against_original is not None and windows and not weights.streamed
        original = copy.deepcopy(loaded) if keeps_copy else loaded
        result = stage(weights, tokenizer=tokenizer, device=device)
        if not distributed.is_main():
            return None
        after = perplexities_after(result, windows, device)
        if against_original is not None and windows:
            against_original(result, original, weights if weights.streamed else None, windows, after, device)
        checked = guard.check(model, out, device, load.mode()) if guard is not None else None
    return SingleRun(result, before, after, checked)
