"""The step of `fit` that the in-memory and the streamed paths share: from the statistics to the candidates
(each path then measures them its own way: `fitting.race` in memory, one shared layer walk streamed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .api import FitResult
    from .fit_method import FitMethod


def search(result: FitResult, adapter, model, stats, method: FitMethod, min_keep: int, sweep: bool, show: Callable[[str], None], others: dict[int, float]) -> None:
    """From the calibration statistics to `result.candidates` (and the swept curve, shown); in memory or streamed alike
    (`model`: loaded, or its meta skeleton). A candidate dropping blocks that the family's config cannot express without
    (`surgery.blocks.check_drop_blocks`: a hybrid stack losing every layer of a kind, a depth-dependent setting) is left
    out, and shown."""
    from ..errors import MoECompressError
    from ..surgery.blocks import check_drop_blocks
    from .proxies import layer_proxies
    from .report import front_lines
    from .search import candidates, sweep as front_of

    sizes = result.sizes
    proxies = layer_proxies(method, adapter, model.config, stats, sizes.group_size, min_keep)
    if sweep:
        result.front = {bits: [(point.bytes, point.cost) for point in points] for bits, points in front_of(sizes, result.floors, proxies, method.substitutes).items()}
        for line in front_lines(result.front):
            show(line)
    result.candidates = []
    for candidate in candidates(sizes, result.floors, proxies, result.weight_budget, method, others):
        try:
            check_drop_blocks(model, adapter, candidate.dropped_blocks)
        except MoECompressError as refused:
            show(f"left out {candidate.name}: {refused}")
            continue
        result.candidates.append(candidate)
