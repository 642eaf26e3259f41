"""moe-compress: compress Mixture-of-Experts language models and save checkpoints that load anywhere."""

from .api import CompressionResult, collect_statistics, compress
from .arch import get_adapter, supported_model_types
from .data import CalibrationSpec
from .errors import MoECompressError
from .evaluate import model_size, perplexity
from .io import load_model, save_compressed
from .plan import LayerPlan, Plan
from .surgery import prune_experts

__all__ = [
    "CalibrationSpec",
    "CompressionResult",
    "LayerPlan",
    "MoECompressError",
    "Plan",
    "collect_statistics",
    "compress",
    "get_adapter",
    "load_model",
    "model_size",
    "perplexity",
    "prune_experts",
    "save_compressed",
    "supported_model_types",
]
__version__ = "0.1.0"
