"""moe-compress: compress Mixture-of-Experts language models and save checkpoints that load anywhere.

The public names below are imported on first use (see `_lazy`), not when the package is:
`import moe_compress` and `moe-compress --help` then cost no torch or transformers import.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._lazy import exports_on_first_use

__version__ = "0.1.0"

# Intel MKL's float32 GEMM picks its kernel by thread count for matrices of a few rows (5-11
# on the 2-core AMD EPYC measured: an expert that received that many tokens in a batch), so its
# outputs, and the statistics and plans built on them, changed with --threads. Strict
# conditional numerical reproducibility gives the same bits for any thread count (and, on that
# machine, the bits one thread gave before). MKL reads it at its first call: importing this
# package before torch multiplies anything is enough; a value already set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

#: The public core, name -> module (relative to this package) that defines it: `compress` runs a
#: composition of stages (`Prune`, `Drop`, `Condense`, `Finetune`, `Slim`, `Quantize`, and any
#: `register_stage` adds) and returns a `Result`; `run_recipe` does the same from YAML.
_CORE = {
    "compress": ".api",
    "fit": ".fitting.api",
    "Result": ".pipeline",
    "Stage": ".stages",
    "Prune": ".stages",
    "Drop": ".stages",
    "Condense": ".stages",
    "Finetune": ".stages",
    "Slim": ".stages",
    "Quantize": ".stages",
    "register_stage": ".stages",
    "run_recipe": ".recipes",
    "CalibrationSpec": ".data",
    "MoECompressError": ".errors",
    "OptionError": ".errors",
    "load_model": ".source",
    "Plan": ".plan",
}
#: Importable from the root, not listed in `__all__`: the plan's per-layer types, and the
#: single-stage calls and helpers of earlier releases (`compress(model, method, ratio)` is one of
#: them), kept for this release.
_EARLIER = {
    "CompressionResult": ".engine.finish",
    "collect_statistics": ".engine.statistics",
    "condense": ".stages.condense",
    "drop": ".stages.drop",
    "get_adapter": ".arch",
    "supported_model_types": ".arch",
    "model_size": ".arch.size",
    "perplexity": ".evaluate",
    "finetune": ".finetuning",
    "save_compressed": ".sink",
    "CondenseLayer": ".plan",
    "DropMoeLayer": ".plan",
    "KeepLayer": ".plan",
    "LayerPlan": ".plan",
    "MergeLayer": ".plan",
    "NoviceLayer": ".plan",
    "SlimResult": ".slimming",
    "slim": ".slimming",
    "QuantizeResult": ".slimming.quantize",
    "quantize": ".slimming.quantize",
    "apply_plan": ".surgery",
    "prune_experts": ".surgery",
}
_EXPORTS = {**_CORE, **_EARLIER}
__all__ = list(_CORE)
__getattr__ = exports_on_first_use(__name__, _EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .api import compress
    from .arch import get_adapter, supported_model_types
    from .data import CalibrationSpec
    from .engine.finish import CompressionResult
    from .engine.statistics import collect_statistics
    from .errors import MoECompressError, OptionError
    from .arch.size import model_size
    from .evaluate import perplexity
    from .finetuning import finetune
    from .fitting.api import fit
    from .source import load_model, save_compressed
    from .pipeline import Result
    from .plan import CondenseLayer, DropMoeLayer, KeepLayer, LayerPlan, MergeLayer, NoviceLayer, Plan
    from .recipes import run_recipe
    from .slimming import SlimResult, slim
    from .slimming.quantize import QuantizeResult, quantize
    from .stages import Condense, Drop, Finetune, Prune, Quantize, Slim, Stage, register_stage
    from .stages.condense import condense
    from .stages.drop import drop
    from .surgery import apply_plan, prune_experts
