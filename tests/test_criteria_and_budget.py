"""Criteria formulas against hand-computed values, and budgets against hand-picked sets."""

from __future__ import annotations

import pytest
import torch

from moe_compress import MoECompressError
from moe_compress.methods.budget import select_experts
from moe_compress.methods.criteria import CRITERIA, layer_scores
from moe_compress.plan import RoutingLimits

# One layer, 4 tokens, 4 experts, top-2: running sums as the observer would hold them.
HAND_STATS = {
    0: {
        "tokens": torch.full((4,), 4.0, dtype=torch.float64),
        "selected": torch.tensor([3.0, 1.0, 0.0, 4.0], dtype=torch.float64),
        "router_dist_sum": torch.tensor([1.6, 0.8, 0.4, 1.2], dtype=torch.float64),
        "gate_sum": torch.tensor([1.5, 0.3, 0.0, 2.2], dtype=torch.float64),
        "output_norm_sum": torch.tensor([6.0, 1.0, 0.0, 10.0], dtype=torch.float64),
        "reap_sum": torch.tensor([1.2, 0.25, 0.0, 3.0], dtype=torch.float64),
    }
}
EXPECTED = {
    "frequency": [0.75, 0.25, 0.0, 1.0],  # |T_e| / T
    "soft_count": [0.4, 0.2, 0.1, 0.3],  # mean_t p
    "gate_sum": [0.375, 0.075, 0.0, 0.55],  # mean_t g
    "ean": [6.0, 1.0, 0.0, 10.0],  # sum over T_e of ||f_e||
    "reap": [0.4, 0.25, 0.0, 0.75],  # reap_sum / |T_e|, 0 for an unused expert
}


@pytest.mark.parametrize("criterion", sorted(EXPECTED))
def test_criterion_equals_hand_computed(criterion):
    scores = layer_scores(criterion, HAND_STATS)[0]
    torch.testing.assert_close(scores, torch.tensor(EXPECTED[criterion], dtype=torch.float64))


def test_every_registered_criterion_is_checked_by_hand():
    assert set(CRITERIA) == set(EXPECTED)


TOP2 = RoutingLimits(top_k=2)


def test_layer_budget_keeps_the_best_per_layer():
    scores = {0: torch.tensor([0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4]), 5: torch.arange(8.0)}
    kept = select_experts(scores, 0.25, "layer", TOP2)
    assert kept == {0: [1, 2, 3, 4, 6, 7], 5: [2, 3, 4, 5, 6, 7]}


@pytest.mark.parametrize(
    "experts, ratio, removed",
    [
        (8, 0.1, 0),  # 0.8 -> 0, as REAP's int(8 * 0.1): nothing is removed
        (10, 0.25, 2),  # 2.5 -> 2 (rounding would remove 3)
        (32, 0.1, 3),  # 3.2 -> 3
        (100, 0.29, 29),  # 0.29 * 100 = 28.999999999999996 in floats: still 29
        (12, 0.5, 6),
    ],
)
def test_removed_count_is_truncated_as_the_references_do(experts, ratio, removed):
    kept = select_experts({0: torch.arange(float(experts))}, ratio, "layer", TOP2)[0]
    assert len(kept) == experts - removed and kept == list(range(removed, experts))


def test_global_removed_count_is_truncated():
    # 2 layers x 10 experts at 0.25: floor(5.0) = 5 removed; at 0.33: floor(6.6) = 6.
    scores = {0: torch.arange(10.0), 1: torch.arange(10.0) + 0.5}
    assert sum(map(len, select_experts(scores, 0.25, "global", TOP2).values())) == 15
    assert sum(map(len, select_experts(scores, 0.33, "global", TOP2).values())) == 14


def test_ties_remove_the_lower_index_first():
    assert select_experts({0: torch.tensor([0.0, 0.0, 1.0, 1.0])}, 0.5, "layer", TOP2) == {0: [2, 3]}
    assert select_experts({0: torch.tensor([1.0, 0.0, 0.0, 1.0])}, 0.25, "layer", TOP2) == {0: [0, 2, 3]}
    # global: equal scores in two layers go from the lower layer first
    kept = select_experts({0: torch.tensor([0.0, 1.0, 1.0]), 1: torch.tensor([0.0, 1.0, 1.0])}, 0.2, "global", TOP2)
    assert kept == {0: [1, 2], 1: [0, 1, 2]}


def test_ratio_zero_keeps_everything():
    scores = {0: torch.rand(8), 1: torch.rand(8)}
    for budget in ("layer", "global"):
        assert select_experts(scores, 0.0, budget, TOP2) == {0: list(range(8)), 1: list(range(8))}


def test_global_budget_moves_experts_to_the_layer_that_needs_them():
    # Layer 1's scores dominate: it keeps all 4; layer 0 keeps only what is left (total 6 of 8).
    scores = {0: torch.tensor([0.01, 0.04, 0.03, 0.02]), 1: torch.tensor([0.5, 0.6, 0.7, 0.8])}
    assert select_experts(scores, 0.25, "global", TOP2) == {0: [1, 2], 1: [0, 1, 2, 3]}


def test_global_budget_respects_the_floor():
    scores = {0: torch.tensor([0.0, 0.0, 0.0, 0.001]), 1: torch.tensor([0.5, 0.6, 0.7, 0.8])}
    kept = select_experts(scores, 0.5, "global", TOP2)
    assert len(kept[0]) == 2 and kept[0][-1] == 3 and len(kept[1]) == 2
    kept = select_experts({0: torch.rand(8), 1: torch.rand(8) + 1}, 0.5, "global", TOP2, min_keep=3)
    assert min(len(k) for k in kept.values()) >= 3 and sum(len(k) for k in kept.values()) == 8


def test_global_normalisation_compares_shares_not_magnitudes():
    # Layer 1's raw scores are larger, but within the layer its last two experts carry little.
    scores = {0: torch.tensor([0.4, 0.3, 0.2, 0.1]), 1: torch.tensor([30.0, 29.0, 2.0, 1.0])}
    raw = select_experts(scores, 0.25, "global", TOP2, normalise=False)
    shared = select_experts(scores, 0.25, "global", TOP2, normalise=True)
    assert [len(raw[0]), len(raw[1])] == [2, 4]
    assert [len(shared[0]), len(shared[1])] == [4, 2]


def test_group_limited_budget_keeps_groups_equal():
    limits = RoutingLimits(top_k=2, groups=2, groups_per_token=1, min_per_group=2)
    scores = {0: torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4])}
    assert select_experts(scores, 0.5, "layer", limits) == {0: [0, 1, 6, 7]}
    # llm-compressor's rule: floor(8 * 0.3) = 2 removed, round(2 / 2) = 1 per group
    assert select_experts(scores, 0.3, "layer", limits) == {0: [0, 1, 2, 5, 6, 7]}
    kept = select_experts({0: torch.rand(8), 1: torch.rand(8) * 5}, 0.25, "global", limits)
    for experts in kept.values():
        assert sum(e < 4 for e in experts) == sum(e >= 4 for e in experts)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_out_of_range_is_refused(ratio):
    with pytest.raises(MoECompressError, match=r"ratio must be in \[0, 1\)"):
        select_experts({0: torch.rand(8)}, ratio, "layer", TOP2)


@pytest.mark.parametrize("budget", ["layer", "global"])
def test_ratio_that_leaves_fewer_than_top_k_is_refused(budget):
    with pytest.raises(MoECompressError, match="fewer than"):
        select_experts({0: torch.rand(8), 1: torch.rand(8)}, 0.9, budget, TOP2)
