"""The Plan: what to do to each MoE layer, separated from doing it.

A plan is pure data. It is written to JSON so users can inspect it, edit it and apply it
again to the same model (`--plan-out` / `--plan-in`), and it is validated against the
router's needs before any tensor is touched.

Because a plan file can be edited, nothing in it is trusted: every field is type-checked on
load (`strict`), each layer entry is one action that checks itself (`layers`), every format
moe-compress ever wrote still reads (`reader`), and a plan records the identity of the model
it was made for (`identity`). Applying it checks that identity against the model at hand,
and the routing limits (top-k, groups) are the model's, never the plan's own fields.

This package is core: it knows no model code, and the surgery that carries out each action
lives in `surgery`.
"""

from .identity import ModelIdentity
from .layers import (
    ACTIONS,
    CondenseLayer,
    DropMoeLayer,
    KeepLayer,
    LayerPlan,
    MergeLayer,
    NoviceLayer,
    RoutingLimits,
)
from .plan import Plan
from .reader import PLAN_FORMAT, layer_action

__all__ = [
    "ACTIONS", "PLAN_FORMAT", "CondenseLayer", "DropMoeLayer", "KeepLayer", "LayerPlan", "MergeLayer", "ModelIdentity",
    "NoviceLayer", "Plan", "RoutingLimits", "layer_action",
]
