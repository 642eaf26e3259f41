"""The sequential observer and the statistics it accumulates."""

from .cache import StatsCache, cache_key, checkpoint_fingerprint, config_fingerprint, content_fingerprint
from .observer import LayerWalk, observe_expert_statistics, run_sequential
from .routed_batch import RoutedBatch
from .statistics import STATISTICS, LayerAccumulator, Statistic

__all__ = [
    "STATISTICS",
    "LayerAccumulator",
    "LayerWalk",
    "RoutedBatch",
    "Statistic",
    "StatsCache",
    "cache_key",
    "checkpoint_fingerprint",
    "config_fingerprint",
    "content_fingerprint",
    "observe_expert_statistics",
    "run_sequential",
]
