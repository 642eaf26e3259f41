"""`fit` on a model that does not fit in memory: every pass reads the checkpoint one decoder layer at a time.

The in-memory fit (`fitting.api`) loads the model whole; this path holds its meta skeleton and
reads weights as each pass reaches them (`source.residency.StreamedWeights`), the rule of every
other command (`streaming` "auto": `source.open.should_stream`). The steps are the in-memory ones,
each streamed:

1. the calibration statistics, by the sequential observer (`engine.statistics.collect_statistics`,
   as prune collects them), and the other decoder weights' rounding costs, one layer read at a time;
2. the search from those statistics (`api.search`, shared with the in-memory path);
3. every candidate measured in one walk over the layers (`fitting.streamed_measure`);
4. the best written by the streamed prune and quantize commands (`fitting.streamed_write`).

The numbers are the in-memory path's: the same statistics, the same plans and rounding, the same
KL up to float summation order, the same written tensors (`tests/test_fit_streamed.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..arch.adapter import MoEAdapter
from ..source.allocator import trim_heap
from ..source.residency import StreamedWeights
from ..text.format import human_bytes
from .steps import search

if TYPE_CHECKING:
    from .api import FitResult
    from .fit_method import FitMethod
    from .search import Candidate


def streamed_other_costs(weights: StreamedWeights, adapter: MoEAdapter, group: int, device: str) -> dict[int, float]:
    """`proxies.other_costs`, each decoder layer's weights in question read in turn: the same sums in the same order."""
    from .proxies import other_weights, rounding_costs, summed_costs
    from ..source.residency import layers_prefix

    model = weights.model
    names = other_weights(model, adapter)
    prefix = f"{layers_prefix(model, adapter)}."
    costs: dict[str, dict[int, float]] = {}
    for index in range(len(adapter.decoder_layers(model))):
        mine = [name for name in names if name.startswith(f"{prefix}{index}.")]
        with weights.loaded_names(mine, device):  # these weights alone, not the layer's experts
            costs |= {name: rounding_costs(model.get_parameter(name), group) for name in mine}
    return summed_costs([costs[name] for name in names])


def fit_streamed(result: FitResult, model: str | Path, calib, out: str | Path | None, overwrite: bool, method: FitMethod, min_keep: int,
                 windows: int, seq_len: int, sweep: bool, device: str, cache_dir, trust_remote_code: bool,
                 say: Callable[[str], None], show: Callable[[str], None]) -> FitResult:
    """Steps 2 and 3 of `fitting.api`'s docstring on the checkpoint `model`, streamed (see the module docstring)."""
    from ..arch.registry import get_adapter
    from ..engine.prepare import calibration_batches
    from ..engine.statistics import collect_statistics
    from ..source.load import load_streamed
    from .measure import held_out_windows
    from .race import slice_bounds
    from .proxies import proxy_statistics
    from .streamed_measure import measure_streamed
    from .streamed_write import write_best_streamed, write_unchanged_streamed

    start = time.perf_counter()
    weights, tokenizer = load_streamed(model, "auto", trust_remote_code)
    skeleton, group = weights.model, result.sizes.group_size
    adapter = get_adapter(skeleton)
    result.seconds["load"] = _since(start)
    if result.unchanged:
        say(f"the original ({human_bytes(result.original_bytes)}) fits the budget of {human_bytes(result.weight_budget)} for weights: nothing to do")
        if out is not None:
            result.output_dir = write_unchanged_streamed(weights, adapter, tokenizer, Path(out), overwrite, result)
        return result
    start = time.perf_counter()
    batches = calibration_batches(calib, tokenizer, skeleton.config)
    # one pass for the proxies and for every statistic the method's plans read (its guard's too): the candidates' plans come from it
    names = proxy_statistics(method, group)
    stats, _ = collect_statistics(skeleton, batches, names, cache_dir, device, weights)
    others = streamed_other_costs(weights, adapter, group, device) if result.sizes.others else {16: 0.0}
    search(result, adapter, skeleton, stats, method, min_keep, sweep, show, others)
    trim_heap()  # what the calibration walk freed, back to the system before the candidates' walk
    result.seconds["calibration"], start = _since(start), time.perf_counter()
    held_out, domains = held_out_windows(tokenizer, skeleton.config, windows, seq_len)
    measured = measure_streamed(weights, adapter, result.candidates, stats, held_out, group, slice_bounds(held_out.shape[0], domains), device)
    for number, (candidate, values) in enumerate(zip(result.candidates, measured), 1):
        candidate.measured = values
        note_measured(result, number, candidate, values, say)
    trim_heap()
    result.seconds["candidates"] = _since(start)  # the original's log-probabilities are computed in the same walk
    if out is not None:
        start = time.perf_counter()
        result.output_dir = write_best_streamed(model, batches, Path(out), overwrite, device, result, cache_dir, trust_remote_code)
        result.seconds["write"] = _since(start)
    return result


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def note_measured(result: FitResult, number: int, candidate: Candidate, measured: dict, say: Callable[[str], None]) -> None:
    """Keep the candidate of least KL (then fewest bytes) as `result.best`, and say how it went."""
    if result.best is None or (measured["kl"], candidate.bytes) < (result.best.measured["kl"], result.best.bytes):
        result.best = candidate
    say(f"measured {number}/{len(result.candidates)}: {candidate.name}: {human_bytes(candidate.bytes)}, KL {measured['kl']:.4g}, "
        f"top-1 {measured['top1']:.3f}, ppl {measured['perplexity']:.3f} (proxy {candidate.proxy:.4g}); "
        f"best so far: {result.best.name}, KL {result.best.measured['kl']:.4g}")
