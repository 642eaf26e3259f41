"""The steps of `fit` that the in-memory and the streamed paths share: from the statistics to the candidates,
and keeping the best as each is measured."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..text.format import human_bytes
from .search import Candidate

if TYPE_CHECKING:
    from .api import FitResult


def search(result: FitResult, adapter, config, stats, method: str, min_keep: int, sweep: bool, show: Callable[[str], None], others: dict[int, float]) -> None:
    """From the calibration statistics to `result.candidates` (and the swept curve, shown); in memory or streamed alike."""
    from .proxies import layer_proxies
    from .report import front_lines
    from .search import candidates, sweep as front_of

    sizes = result.sizes
    proxies = layer_proxies(method, adapter, config, stats, sizes.group_size, min_keep)
    if sweep:
        result.front = {bits: [(point.bytes, point.cost) for point in points] for bits, points in front_of(sizes, result.floors, proxies).items()}
        for line in front_lines(result.front):
            show(line)
    result.candidates = candidates(sizes, result.floors, proxies, result.weight_budget, method, others)


def note_measured(result: FitResult, number: int, candidate: Candidate, measured: dict, say: Callable[[str], None]) -> None:
    """Keep the candidate of least KL (then fewest bytes) as `result.best`, and say how it went."""
    if result.best is None or (measured["kl"], candidate.bytes) < (result.best.measured["kl"], result.best.bytes):
        result.best = candidate
    say(f"measured {number}/{len(result.candidates)}: {candidate.name}: {human_bytes(candidate.bytes)}, KL {measured['kl']:.4g}, "
        f"top-1 {measured['top1']:.3f}, ppl {measured['perplexity']:.3f} (proxy {candidate.proxy:.4g}); "
        f"best so far: {result.best.name}, KL {result.best.measured['kl']:.4g}")
