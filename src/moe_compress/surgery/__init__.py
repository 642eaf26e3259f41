"""Surgery: apply a Plan to an in-memory model."""

from .blocks import drop_blocks
from .experts import apply_plan, prune_experts
from ..arch.structure import experts_per_layer, sync_config_structure

__all__ = ["apply_plan", "drop_blocks", "experts_per_layer", "prune_experts", "sync_config_structure"]
