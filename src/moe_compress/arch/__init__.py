"""Architecture adapters: where each family keeps its routers, experts and shared experts."""

from .adapter import ExpertTensor, MoEAdapter
from .expert_math import expert_forward
from .registry import ADAPTERS, get_adapter, supported_model_types

__all__ = ["ADAPTERS", "ExpertTensor", "MoEAdapter", "expert_forward", "get_adapter", "supported_model_types"]
