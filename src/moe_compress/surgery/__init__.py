"""Surgery: apply a Plan to an in-memory model."""

from .experts import prune_experts
from .structure import experts_per_layer, sync_config_structure

__all__ = ["experts_per_layer", "prune_experts", "sync_config_structure"]
