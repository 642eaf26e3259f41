"""One routed expert's output f_e(x).

The implementation lives in `runtime.py`, which saved checkpoints carry with them, so the
expert math moe-compress measures with is the math a reloaded model runs.
"""

from ..runtime import expert_forward

__all__ = ["expert_forward"]
