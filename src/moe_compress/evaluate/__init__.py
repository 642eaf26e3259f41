"""Measuring what compression lost and gained: perplexity, multiple-choice accuracy, speed (sizes: `arch.size`).

Names are imported on first use (`moe_compress._lazy`): the CLI reads `protocol` and `models` (the
eval command's options) for its --help without importing torch or lm-eval.
"""

from __future__ import annotations

from .._lazy import exports_on_first_use

_EXPORTS = {
    "TaskScore": ".harness", "run_tasks": ".harness", "select_tasks": ".harness",
    "PerplexityResult": ".lm_perplexity", "perplexity": ".lm_perplexity",
    "SpeedComparison": ".speed", "SpeedResult": ".speed", "SpeedSettings": ".speed", "compare_speed": ".speed",
    "measure_speed": ".speed", "peak_rss_bytes": ".speed",
}
__all__ = sorted(_EXPORTS)
__getattr__ = exports_on_first_use(__name__, _EXPORTS)
