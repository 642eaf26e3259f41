"""Compression methods: they read observed statistics and return a Plan.

Importing this package registers every built-in method in `METHODS`.
"""

from . import cprune, cprune_cosine, expert_pruning, merging, merging_ream, mone  # noqa: F401  (registration)
from .criteria import CRITERIA, Criterion
from .expert_pruning import plan_expert_pruning
from .registry import METHODS, Method, PlanRequest, get_method, register

__all__ = ["CRITERIA", "METHODS", "Criterion", "Method", "PlanRequest", "get_method", "plan_expert_pruning", "register"]
