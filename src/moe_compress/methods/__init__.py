"""Compression methods: they read observed statistics and return a Plan."""

from .criteria import CRITERIA, Criterion
from .expert_pruning import plan_expert_pruning

__all__ = ["CRITERIA", "Criterion", "plan_expert_pruning"]
