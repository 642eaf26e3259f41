"""The compression stages, one module each, and their registry (see `base` for the shape they share).

    import moe_compress as mc
    mc.compress("ref-mixtral", [mc.Prune("reap", ratio=0.25), mc.Slim("wanda", sparsity=0.5), mc.Quantize(bits=4)], out="small/")
"""

from .base import Stage, StageContext, StageOutcome
from .condense import Condense
from .drop import Drop
from .finetune import Finetune
from .prune import Prune
from .quantize import Quantize
from .registry import build_stage, register_stage, stages
from .slim import Slim

__all__ = ["Condense", "Drop", "Finetune", "Prune", "Quantize", "Slim", "Stage", "StageContext", "StageOutcome", "build_stage",
           "register_stage", "stages"]
