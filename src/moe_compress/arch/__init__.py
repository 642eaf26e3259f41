"""Architecture adapters: where each family keeps its routers, experts and shared experts."""

from .adapter import ExpertTensor, MoEAdapter
from .catalog import auto_model_class, standard_moe_model_types
from .expert_math import expert_forward
from .registry import get_adapter, refusal, supported_model_types

__all__ = [
    "ExpertTensor",
    "MoEAdapter",
    "auto_model_class",
    "expert_forward",
    "get_adapter",
    "refusal",
    "standard_moe_model_types",
    "supported_model_types",
]
