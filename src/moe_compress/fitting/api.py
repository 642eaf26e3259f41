"""`mc.fit`: the best compressed model that fits a memory budget, searched across expert pruning and bit widths.

    import moe_compress as mc
    result = mc.fit("ref-mixtral", memory="12MB", out="fitted/")
    print(result.best.name, result.best.measured["kl"])

In order, each step only when the one before it succeeded:
1. sizes from the config and the shard headers (`stages.sizes`), the budget less the KV cache at
   `context` (`fitting.memory`); a budget under the smallest reachable size is refused, one at or
   above the original returns it unchanged -- both before anything is calibrated;
2. one calibration pass collects the proxies' statistics with the superset every pruning method
   reads (cached: the prune stages the candidates run find theirs there);
3. the search (`fitting.search`) -> the candidates raced end to end on held-out windows (`fitting.race`,
   `fitting.measure`: losers stopped on a slice, the rest measured on every window) -> the one of least
   held-out KL written with `pipeline.run_stages`, its report beside it (`fitting.report`), its prune plan recording the search (so `prune --plan-in` replays the artifact's pruning).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.batches import CalibrationSpec
from ..engine.prepare import Calibration, calibration_batches
from ..errors import MoECompressError, OptionError, param
from ..source.open import Streaming, should_stream
from ..text.format import human_bytes
from ..stages.sizes import BITS, CheckpointSizes, checkpoint_sizes
from .memory import kv_cache_bytes, parse_bytes
from .fit_method import FitMethod
from .search import Candidate, smallest
from .steps import search

if TYPE_CHECKING:
    from ..preflight import Structure


@dataclass
class FitResult:
    """What `fit` found: the budget's arithmetic, every candidate (measured unless a dry run), the best, where it went."""

    original_bytes: int
    budget: int  # the whole budget, bytes
    kv_bytes: int  # the KV cache (or recurrent state) at the context, 0 without one
    smallest_bytes: int  # the smallest saved size any allocation reaches
    floors: dict[int, list[int]]  # per MoE layer, the kept counts its router allows
    sizes: CheckpointSizes | None = field(default=None, repr=False)  # the checkpoint's parts (from its headers)
    candidates: list[Candidate] = field(default_factory=list)
    best: Candidate | None = None  # None: a dry run, or the original unchanged
    front: dict = field(default_factory=dict)  # bits -> [(bytes, proxy)]: the predicted curve (sweep)
    output_dir: Path | None = None
    unchanged: bool = False
    # wall seconds per phase (sizes, load, calibration, reference, candidates, write): what a fit spends its time on;
    # for benchmarks and progress, never written into the output (its bytes do not depend on time)
    seconds: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def weight_budget(self) -> int:
        return self.budget - self.kv_bytes


def _floors(structure: Structure, min_keep: int) -> dict[int, list[int]]:
    """Per MoE layer, every kept count its router allows: multiples of its routing groups from max(top_k, min_keep) up."""
    from ..methods.expert_pruning import routing_limits

    limits = routing_limits(structure.adapter, structure.model.config)
    floor = max(limits.min_units(), math.ceil(min_keep / limits.groups)) * limits.groups
    return {layer: list(range(floor, count + 1, limits.groups)) for layer, count in structure.experts.items()}


def _budget(model: str | Path, sizes: CheckpointSizes, memory: str | int | None, target_ratio: float | None, context: int | None,
            batch: int, trust_remote_code: bool) -> tuple[int, int]:
    """(whole budget, KV cache bytes): `memory` as written, or `target_ratio` x the original (weights, and cache at `context`)."""
    from ..source.load import load_config

    if (memory is None) == (target_ratio is None):
        raise MoECompressError(f"give exactly one of {param('memory')} (e.g. 20GB) or {param('target_ratio')} (e.g. 0.4 of the original's size).")
    kv = kv_cache_bytes(load_config(model, trust_remote_code)[1], context, batch) if context is not None else 0
    if target_ratio is not None:
        if not (isinstance(target_ratio, int | float) and 0 < target_ratio <= 1):
            raise OptionError("target_ratio", f"must be in (0, 1]; got {target_ratio!r}.")
        return int((sizes.total + kv) * target_ratio), kv
    return parse_bytes(memory, param("memory")), kv


def plan_budget(model: str | Path, memory=None, target_ratio=None, context=None, batch=1, min_keep=0, trust_remote_code=False,
                method: FitMethod | None = None) -> FitResult:
    """Steps 1 of the module docstring: the sizes and the budget, refusing an unreachable one (for `method`: MoNE's novices
    weigh something). Nothing is calibrated."""
    if not isinstance(model, str | Path):
        raise MoECompressError("fit reads the checkpoint's sizes from its shard headers: give a model name or a local directory, not a model in memory.")
    from ..preflight import skeleton

    structure = skeleton(model, "auto", trust_remote_code)
    sizes = checkpoint_sizes(model, trust_remote_code=trust_remote_code, structure=structure)
    budget, kv = _budget(model, sizes, memory, target_ratio, context, batch, trust_remote_code)
    floors = _floors(structure, min_keep)
    result = FitResult(sizes.total, budget, kv, smallest(sizes, floors, (method or FitMethod()).substitutes), floors, sizes)
    cache = f" after the KV cache of {human_bytes(kv)} at context {context} x batch {batch}" if context is not None else ""
    if result.weight_budget < result.smallest_bytes:
        fewest = min(min(counts) for counts in floors.values())
        layers = "every MoE layer's whole block but one dropped, that one" if len(sizes.layers) > 1 else "the MoE layer"
        raise MoECompressError(
            f"the budget leaves {human_bytes(max(result.weight_budget, 0))} for the weights{cache}, below the smallest size fit can reach, "
            f"{human_bytes(result.smallest_bytes)} ({result.smallest_bytes} bytes: {layers} at {fewest} experts, {min(BITS)} bits"
            + (f", the other decoder weights at {min(BITS)} bits too" if sizes.others else "") + "); "
            f"raise {param('memory')}" + (f" or shorten {param('context')}." if context is not None else ".")
        )
    result.unchanged = result.weight_budget >= sizes.total
    return result


def fit(
    model: str | Path,
    memory: str | int | None = None,
    target_ratio: float | None = None,
    context: int | None = None,
    batch: int = 1,
    calib: Calibration = CalibrationSpec(samples=128),
    out: str | Path | None = None,
    dry_run: bool = False,
    sweep: bool = False,
    method: str = "reap",
    method_options: dict[str, Any] | None = None,
    min_keep: int = 0,
    windows: int = 32,
    seq_len: int = 256,
    overwrite: bool = False,
    device: str = "cpu",
    cache_dir: str | Path | None | bool = None,
    trust_remote_code: bool = False,
    streaming: Streaming = "auto",
    say: Callable[[str], None] | None = None,
    show: Callable[[str], None] | None = None,
) -> FitResult:
    """The compression of `model` (a local checkpoint or bundled name) of least held-out KL whose saved
    weights (plus the KV cache at `context` x `batch`, when given) fit `memory` ("20GB", "512MiB", bytes)
    or `target_ratio` of the original; written to `out` when given. `method` chooses which experts each
    kept count keeps (`accepted.FIT_METHODS`), with `method_options` as `Prune` takes them (C-Prune's
    `clusters`, ...): the proxies, the candidates and the single-method baseline all use them. `dry_run`: the budget and the
    search space only, nothing calibrated. `sweep`: also the predicted quality-vs-size curve
    (`result.front`). `windows` per bundled domain of `seq_len` tokens are the held-out text the
    candidates are measured on; `say` receives progress lines (candidates measured, best so far) and
    `show` the swept curve, before anything is measured. `streaming` as every command takes it (`source.open`):
    a model that does not fit in memory is read one decoder layer at a time (`fitting.streamed`)."""
    from ..sink.save import check_output_dir

    say, show = say or (lambda line: None), show or (lambda line: None)
    chosen = FitMethod(method, dict(method_options or {}))
    start = time.perf_counter()
    result = plan_budget(model, memory, target_ratio, context, batch, min_keep, trust_remote_code, chosen)
    result.seconds["sizes"] = _since(start)
    if out is not None:
        check_output_dir(out, overwrite, [model])
    if dry_run:
        return result
    if out is not None:
        from .front_plot import warm_up

        warm_up()
    if should_stream(model, streaming, device):
        from .streamed import fit_streamed

        return fit_streamed(result, model, calib, out, overwrite, chosen, min_keep, windows, seq_len, sweep, device, cache_dir,
                            trust_remote_code, say, show)
    from ..source.load import load_model

    start = time.perf_counter()
    loaded, tokenizer = load_model(model, device=device, trust_remote_code=trust_remote_code)
    result.seconds["load"] = _since(start)
    if result.unchanged:
        say(f"the original ({human_bytes(result.original_bytes)}) fits the budget of {human_bytes(result.weight_budget)} for weights: nothing to do")
        if out is not None:
            from .write import write_unchanged

            result.output_dir = write_unchanged(loaded, tokenizer, Path(out), overwrite, result)
        return result
    batches = calibration_batches(calib, tokenizer, loaded.config)
    _search_and_measure(result, loaded, tokenizer, batches, chosen, min_keep, windows, seq_len, sweep, device, cache_dir, say, show,
                        Path(out) if out is not None else None)
    if out is not None:
        from .write import write_best

        start = time.perf_counter()
        result.output_dir = write_best(loaded, tokenizer, batches, Path(out), overwrite, device, result, str(model))
        result.seconds["write"] = _since(start)
    return result


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 2)


def _holdable(model, device: str) -> int:
    """How many built candidates the race may keep between slices: copies of `model` (a candidate is no larger) in half
    of the memory left on `device`, so that holding them never decides whether the fit runs."""
    from ..source.open import available_bytes

    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(available_bytes(device) // 2 // max(size, 1))


def _search_and_measure(result: FitResult, loaded, tokenizer, batches, method: FitMethod, min_keep, windows, seq_len, sweep, device, cache_dir, say, show,
                        out: Path | None) -> None:
    """Steps 2 and 3 of the module docstring, up to the best candidate measured (`result.best`)."""
    import tempfile

    from ..arch.registry import get_adapter
    from ..engine.statistics import collect_statistics
    from ..source.allocator import trim_heap
    from .measure import Reference, build, held_out_windows
    from .proxies import other_costs, proxy_statistics
    from .race import race, slice_bounds

    adapter = get_adapter(loaded)
    start = time.perf_counter()
    stats, _ = collect_statistics(loaded, batches, proxy_statistics(method, result.sizes.group_size), cache_dir, device)
    search(result, adapter, loaded, stats, method, min_keep, sweep, show,
           other_costs(loaded, adapter, result.sizes.group_size) if result.sizes.others else {16: 0.0})
    result.seconds["calibration"], start = _since(start), time.perf_counter()
    held_out, domains = held_out_windows(tokenizer, loaded.config, windows, seq_len)
    reference = Reference.of(loaded, held_out, slice_bounds(held_out.shape[0], domains))
    result.seconds["reference"], start = _since(start), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moe-compress-fit-", dir=out.parent if out is not None else None) as scratch:
        result.best = race(result.candidates, lambda number, c: build(c, loaded, tokenizer, batches, result.sizes.group_size, Path(scratch) / f"build-{number}",
                                                                        device), reference, loaded, say, _holdable(loaded, device))
    del reference  # the original's log-probabilities and the measurement's blocks, and the heap pages they took, go back
    trim_heap()
    result.seconds["candidates"] = _since(start)

