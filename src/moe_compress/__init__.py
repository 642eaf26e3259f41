"""moe-compress: compress Mixture-of-Experts language models and save checkpoints that load anywhere.

The public names below are imported on first use (see `_lazy`), not when the package is:
`import moe_compress` and `moe-compress --help` then cost no torch or transformers import.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._lazy import lazy_package

__version__ = "0.1.0"

# Intel MKL's float32 GEMM picks its kernel by thread count for matrices of a few rows (5-11
# on the 2-core AMD EPYC measured: an expert that received that many tokens in a batch), so its
# outputs, and the statistics and plans built on them, changed with --threads. Strict
# conditional numerical reproducibility gives the same bits for any thread count (and, on that
# machine, the bits one thread gave before). MKL reads it at its first call: importing this
# package before torch multiplies anything is enough; a value already set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

#: public name -> module (relative to this package) that defines it
_EXPORTS = {
    "CompressionResult": ".api",
    "collect_statistics": ".api",
    "compress": ".api",
    "condense": ".api",
    "drop": ".api",
    "get_adapter": ".arch",
    "supported_model_types": ".arch",
    "CalibrationSpec": ".data",
    "MoECompressError": ".errors",
    "model_size": ".evaluate",
    "perplexity": ".evaluate",
    "finetune": ".finetune",
    "load_model": ".io",
    "save_compressed": ".io",
    "CondenseLayer": ".plan",
    "DropMoeLayer": ".plan",
    "KeepLayer": ".plan",
    "LayerPlan": ".plan",
    "MergeLayer": ".plan",
    "NoviceLayer": ".plan",
    "Plan": ".plan",
    "register_stage": ".recipes",
    "run_recipe": ".recipes",
    "SlimResult": ".slimming",
    "slim": ".slimming",
    "QuantizeResult": ".slimming.quantize",
    "quantize": ".slimming.quantize",
    "apply_plan": ".surgery",
    "prune_experts": ".surgery",
}
__all__ = lazy_package(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import CompressionResult, collect_statistics, compress, condense, drop
    from .arch import get_adapter, supported_model_types
    from .data import CalibrationSpec
    from .errors import MoECompressError
    from .evaluate import model_size, perplexity
    from .finetune import finetune
    from .io import load_model, save_compressed
    from .plan import CondenseLayer, DropMoeLayer, KeepLayer, LayerPlan, MergeLayer, NoviceLayer, Plan
    from .recipes import register_stage, run_recipe
    from .slimming import SlimResult, slim
    from .slimming.quantize import QuantizeResult, quantize
    from .surgery import apply_plan, prune_experts
