"""Measuring what compression lost and gained: perplexity, multiple-choice accuracy, size, speed."""

from .harness import TaskScore, run_tasks, select_tasks
from .perplexity import PerplexityResult, perplexity
from .size import ModelSize, checkpoint_bytes, model_size
from .speed import SpeedComparison, SpeedResult, SpeedSettings, compare_speed, measure_speed, peak_rss_bytes

__all__ = [
    "ModelSize", "PerplexityResult", "SpeedComparison", "SpeedResult", "SpeedSettings", "TaskScore", "checkpoint_bytes",
    "compare_speed", "measure_speed", "model_size", "peak_rss_bytes", "perplexity", "run_tasks", "select_tasks",
]
