"""Expert pruning by an importance criterion: statistics in, Plan out (one method per criterion)."""

from __future__ import annotations

import torch

from ..arch.adapter import MoEAdapter
from ..plan import LayerPlan, Plan, RoutingLimits
from .budget import Budget, select_experts
from .criteria import CRITERIA, layer_scores
from .registry import Method, PlanRequest, register


def routing_limits(adapter: MoEAdapter, config) -> RoutingLimits:
    """What each layer's router needs to keep working after pruning."""
    groups, per_token = adapter.routing_groups(config)
    # DeepSeek-V3/GLM (and Mistral 4's softmax router) score a group by the sum of its two best experts.
    min_per_group = adapter.group_score_experts if groups > 1 else 1
    return RoutingLimits(adapter.top_k(config), groups, per_token, min_per_group)


def plan_expert_pruning(
    adapter: MoEAdapter,
    config,
    stats: dict[int, dict[str, torch.Tensor]],
    criterion: str,
    ratio: float,
    budget: Budget = "layer",
    min_keep: int = 0,
) -> Plan:
    limits = routing_limits(adapter, config)
    scores = layer_scores(criterion, stats)
    kept = select_experts(scores, ratio, budget, limits, CRITERIA[criterion].normalise_globally, min_keep)
    layers = [LayerPlan(layer, s.numel(), kept[layer], [float(v) for v in s]) for layer, s in sorted(scores.items())]
    plan = Plan(
        model_type=adapter.model_type,
        top_k=limits.top_k,
        layers=layers,
        method=criterion,
        ratio=ratio,
        budget=budget,
        routing_groups=limits.groups,
        groups_per_token=limits.groups_per_token,
        min_per_group=limits.min_per_group,
    )
    plan.validate()
    return plan


def _criterion_method(criterion: str) -> Method:
    def plan(request: PlanRequest) -> Plan:
        return plan_expert_pruning(
            request.adapter, request.config, request.stats, criterion, request.ratio, request.budget, request.min_keep
        )

    return Method(criterion, CRITERIA[criterion].statistics, plan, CRITERIA[criterion].doc)


for _name in CRITERIA:
    register(_criterion_method(_name))
