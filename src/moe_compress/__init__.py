"""moe-compress: compress Mixture-of-Experts language models and save checkpoints that load anywhere."""

from .api import CompressionResult, collect_statistics, compress, condense, drop
from .arch import get_adapter, supported_model_types
from .data import CalibrationSpec
from .errors import MoECompressError
from .evaluate import model_size, perplexity
from .finetune import finetune
from .io import load_model, save_compressed
from .plan import LayerPlan, Plan
from .recipes import register_stage, run_recipe
from .slimming import SlimResult, slim
from .slimming.quantize import QuantizeResult, quantize
from .surgery import apply_plan, prune_experts

__all__ = [
    "CalibrationSpec",
    "CompressionResult",
    "LayerPlan",
    "MoECompressError",
    "Plan",
    "QuantizeResult",
    "SlimResult",
    "apply_plan",
    "collect_statistics",
    "compress",
    "condense",
    "drop",
    "finetune",
    "get_adapter",
    "load_model",
    "model_size",
    "perplexity",
    "prune_experts",
    "register_stage",
    "run_recipe",
    "quantize",
    "save_compressed",
    "slim",
    "supported_model_types",
]
__version__ = "0.1.0"
