"""The compression stages, one module each, and their registry (see `base` for the shape they share).

    import moe_compress as mc
    mc.compress("ref-mixtral", [mc.Prune("reap", ratio=0.25), mc.Slim("wanda", sparsity=0.5), mc.Quantize(bits=4)], out="small/")

The stage classes are imported on first use (`_lazy`): their options (`stages.options`) are read
by the command line, which must not import torch for `--help`.
"""

from .._lazy import exports_on_first_use
from .base import Stage, StageContext, StageOutcome
from .registry import build_stage, register_stage, stages

__getattr__ = exports_on_first_use(__name__, {kind: f".{kind.lower()}" for kind in ("Condense", "Drop", "Finetune", "Prune", "Quantize", "Slim")})

__all__ = ["Condense", "Drop", "Finetune", "Prune", "Quantize", "Slim", "Stage", "StageContext", "StageOutcome", "build_stage",
           "register_stage", "stages"]
