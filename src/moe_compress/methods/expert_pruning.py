"""Expert pruning by an importance criterion: statistics in, Plan out (one method per criterion)."""

from __future__ import annotations

from typing import Literal

import torch

from ..arch.adapter import MoEAdapter
from ..errors import MoECompressError
from ..plan import KeepLayer, Plan, RoutingLimits
from .budget import Budget, select_experts
from .criteria import CRITERIA, layer_scores, reap_scores
from .registry import Method, PlanRequest, register


def routing_limits(adapter: MoEAdapter, config) -> RoutingLimits:
    """What each layer's router needs to keep working after pruning."""
    groups, per_token = adapter.routing_groups(config)
    # DeepSeek-V3/GLM (and Mistral 4's softmax router) score a group by the sum of its two best experts.
    min_per_group = adapter.group_score_experts if groups > 1 else 1
    return RoutingLimits(adapter.top_k(config), groups, per_token, min_per_group)


def plan_from_scores(
    adapter: MoEAdapter,
    config,
    scores: dict[int, torch.Tensor],
    method: str,
    ratio: float,
    budget: Budget = "layer",
    min_keep: int = 0,
    normalise: bool = False,
    keep: dict[int, int] | None = None,
) -> Plan:
    """A plan that keeps the best-scored experts of every layer under the budget (`keep`: an explicit one's counts)."""
    limits = routing_limits(adapter, config)
    kept = select_experts(scores, ratio, budget, limits, normalise, min_keep, keep)
    layers = [KeepLayer(layer=layer, num_experts=s.numel(), keep=kept[layer], scores=[float(v) for v in s]) for layer, s in sorted(scores.items())]
    plan = Plan(
        model_type=adapter.model_type,
        top_k=limits.top_k,
        layers=layers,
        method=method,
        ratio=ratio,
        budget=budget,
        routing_groups=limits.groups,
        groups_per_token=limits.groups_per_token,
        min_per_group=limits.min_per_group,
    )
    plan.validate()
    return plan


def plan_expert_pruning(
    adapter: MoEAdapter,
    config,
    stats: dict[int, dict[str, torch.Tensor]],
    criterion: str,
    ratio: float,
    budget: Budget = "layer",
    min_keep: int = 0,
    keep: dict[int, int] | None = None,
) -> Plan:
    scores = layer_scores(criterion, stats)
    return plan_from_scores(adapter, config, scores, criterion, ratio, budget, min_keep, CRITERIA[criterion].normalise_globally, keep)


def _criterion_method(criterion: str) -> Method:
    def plan(request: PlanRequest) -> Plan:
        return plan_expert_pruning(
            request.adapter, request.config, request.stats, criterion, request.ratio, request.budget, request.min_keep, request.keep
        )

    return Method(criterion, CRITERIA[criterion].statistics, plan, CRITERIA[criterion].doc, layer_local=True)


def _reap_statistics(options: dict) -> tuple[str, ...]:
    choice = options["renormalize"]
    sums = {"model": ("reap_sum", "reap_prob_sum"), True: ("reap_sum",), False: ("reap_prob_sum",)}
    if choice not in sums:
        raise MoECompressError(f"reap: renormalize must be 'model', true or false; got {choice!r}.")
    return (*sums[choice], "selected")


def plan_reap(request: PlanRequest, renormalize: bool | Literal["model"] = "model") -> Plan:
    """REAP, with g renormalised over the top-k as the model does ('model'), always (True) or never (False).

    'model' is the authors' rule (renormalise iff `norm_topk_prob`), read through the adapter so that
    families whose routers always renormalise (Mixtral, GPT-OSS, Granite, Ernie) count as renormalising.
    True reproduces what moe-compress did before: renormalised gates for every family. False uses the
    router probabilities of the selected experts for every family.
    """
    _reap_statistics({"renormalize": renormalize})
    renormalise = request.adapter.renormalizes_top_k(request.config) if renormalize == "model" else bool(renormalize)
    scores = {layer: reap_scores(s, renormalise).double() for layer, s in request.stats.items()}
    plan = plan_from_scores(request.adapter, request.config, scores, "reap", request.ratio, request.budget, request.min_keep, True, request.keep)
    plan.meta = {"renormalize": renormalize, "renormalised": renormalise}
    return plan


for _name in CRITERIA:
    if _name != "reap":
        register(_criterion_method(_name))
register(
    Method(
        "reap", _reap_statistics, plan_reap, CRITERIA["reap"].doc + "; top-k gates renormalised as the model does",
        options={"renormalize": "model"},
        option_help={"renormalize": "renormalise the top-k gates as the model does (model, the authors' rule), always (true) or never (false)"},
        layer_local=True,
    )
)
