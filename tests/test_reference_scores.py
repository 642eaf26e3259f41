"""The authors' scoring choices on hand-computed cases: REAP's renormalisation, soft_count on
sigmoid routers, MoNE's scopes and tie rule."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import token_batches
from moe_compress import MoECompressError, compress
from moe_compress.arch.registry import get_adapter
from moe_compress.methods import PlanRequest, get_method
from moe_compress.methods.mone import remove_boundary_ties, running_variation
from moe_compress.walk.routed_batch import RoutedBatch
from moe_compress.walk.statistics import STATISTICS
from tiny_models import tiny_model

ADAPTERS = {name: get_adapter(tiny_model(name)) for name in ("mixtral", "qwen2_moe", "deepseek_v3")}

#: Hand-made statistics carry no activation maxima: the super-expert guard is switched off.
NO_GUARD = {"protect_super_experts": False}


def _routed_batch(adapter, logits, top_idx, top_w, norms):
    """A RoutedBatch whose expert outputs are given: expert e's output on token t has norm norms[t][e]."""
    top_idx, top_w = torch.tensor(top_idx), torch.tensor(top_w, dtype=torch.float64)
    batch = RoutedBatch(torch.zeros(len(top_idx), 2), torch.tensor(logits), top_idx, top_w, adapter, experts=None)
    pairs = zip(batch.pair_token.tolist(), batch.pair_expert.tolist())  # the (token, expert) pairs in the batch's order
    batch.pair_outputs = torch.tensor([[norms[t][e], 0.0] for t, e in pairs], dtype=torch.float64)
    return batch


# Softmax router, 3 experts, top-2. Token 0 picks experts 0, 1; token 1 picks 2, 1.
LOGITS = [[math.log(5.0), math.log(3.0), math.log(2.0)], [math.log(1.0), math.log(3.0), math.log(6.0)]]  # p0 = [.5,.3,.2], p1 = [.1,.3,.6]
TOP_IDX = [[0, 1], [2, 1]]
NORMS = [[2.0, 4.0, 0.0], [0.0, 1.0, 3.0]]


def test_reap_sums_with_and_without_renormalisation():
    adapter = ADAPTERS["qwen2_moe"]
    applied = [[0.5, 0.3], [0.6, 0.3]]  # qwen2_moe without norm_topk_prob applies the probabilities
    batch = _routed_batch(adapter, LOGITS, TOP_IDX, applied, NORMS)
    # renormalised: token 0: g = [.5/.8, .3/.8]; token 1: g = [.6/.9, .3/.9]
    expected_renorm = [0.625 * 2.0, 0.375 * 4.0 + (1 / 3) * 1.0, (2 / 3) * 3.0]
    expected_prob = [0.5 * 2.0, 0.3 * 4.0 + 0.3 * 1.0, 0.6 * 3.0]
    torch.testing.assert_close(STATISTICS["reap_sum"].update(batch), torch.tensor(expected_renorm, dtype=torch.float64))
    torch.testing.assert_close(STATISTICS["reap_prob_sum"].update(batch), torch.tensor(expected_prob, dtype=torch.float64))


def _reap_plan(adapter, config, renormalize, ratio=1 / 3):
    # One layer; |T_e| = [1, 2, 1]. Means: renorm [1.25, 0.9167, 2.0]; prob [1.0, 0.75, 1.8].
    stats = {0: {
        "tokens": torch.full((3,), 2.0, dtype=torch.float64),
        "selected": torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64),
        "reap_sum": torch.tensor([1.25, 1.5 + 1 / 3, 2.0], dtype=torch.float64),
        "reap_prob_sum": torch.tensor([1.0, 1.5, 1.8], dtype=torch.float64),
    }}
    return get_method("reap").make_plan(PlanRequest(adapter, config, stats, ratio), {**NO_GUARD, "renormalize": renormalize})


@pytest.mark.parametrize("norm_topk_prob, renormalised", [(True, True), (False, False)])
def test_reap_renormalises_exactly_when_the_model_does(norm_topk_prob, renormalised):
    model = tiny_model("qwen2_moe", norm_topk_prob=norm_topk_prob, num_experts=3, num_experts_per_tok=1)
    plan = _reap_plan(ADAPTERS["qwen2_moe"], model.config, "model")
    expected = [1.25, 0.5 * (1.5 + 1 / 3), 2.0] if renormalised else [1.0, 0.75, 1.8]
    assert plan.meta["renormalised"] is renormalised
    assert plan.layers[0].scores == pytest.approx(expected)


def test_reap_switch_overrides_the_model_and_changes_the_ranking():
    model = tiny_model("qwen2_moe", norm_topk_prob=False, num_experts=3, num_experts_per_tok=1)
    # Raw probabilities rank expert 1 lowest (0.75 < 1.0); renormalised gates rank it lowest too but
    # with expert 0 at 1.25 -- make them disagree with a different layout:
    stats = {0: {
        "tokens": torch.full((3,), 2.0, dtype=torch.float64),
        "selected": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64),
        "reap_sum": torch.tensor([0.9, 0.5, 2.0], dtype=torch.float64),  # renormalised: expert 1 is removed
        "reap_prob_sum": torch.tensor([0.3, 0.45, 1.0], dtype=torch.float64),  # probabilities: expert 0 is removed
    }}
    request = PlanRequest(ADAPTERS["qwen2_moe"], model.config, stats, 1 / 3)
    assert get_method("reap").make_plan(request, {**NO_GUARD, "renormalize": True}).layers[0].keep == [0, 2]
    assert get_method("reap").make_plan(request, {**NO_GUARD, "renormalize": False}).layers[0].keep == [1, 2]
    assert get_method("reap").make_plan(request, NO_GUARD).layers[0].keep == [1, 2]  # the model does not renormalise


def test_families_that_always_renormalise_say_so():
    mixtral = tiny_model("mixtral")
    assert ADAPTERS["mixtral"].renormalizes_top_k(mixtral.config)  # softmax over the top-k, no config flag
    assert ADAPTERS["deepseek_v3"].renormalizes_top_k(tiny_model("deepseek_v3", norm_topk_prob=True).config)
    assert not ADAPTERS["deepseek_v3"].renormalizes_top_k(tiny_model("deepseek_v3", norm_topk_prob=False).config)
    assert not get_adapter(tiny_model("deepseek_v2")).renormalizes_top_k(tiny_model("deepseek_v2").config)


def test_unknown_renormalize_value_is_refused():
    with pytest.raises(MoECompressError, match="renormalize"):
        _reap_plan(ADAPTERS["mixtral"], tiny_model("mixtral").config, "sometimes")


def test_soft_count_normalises_sigmoid_scores_per_token():
    # sigmoid(0) = 0.5, sigmoid(ln 3) = 0.75 -> distribution [0.4, 0.6]; softmax routers are left alone.
    logits = [[0.0, math.log(3.0)], [math.log(3.0), math.log(3.0)]]
    sigmoid = _routed_batch(ADAPTERS["deepseek_v3"], logits, [[1], [0]], [[1.0], [1.0]], [[0, 1], [1, 0]])
    torch.testing.assert_close(STATISTICS["router_dist_sum"].update(sigmoid), torch.tensor([0.9, 1.1], dtype=torch.float64))
    softmax = _routed_batch(ADAPTERS["mixtral"], logits, [[1], [0]], [[1.0], [1.0]], [[0, 1], [1, 0]])
    assert torch.equal(STATISTICS["router_dist_sum"].update(softmax), STATISTICS["prob_sum"].update(softmax))


def test_soft_count_global_budget_on_a_sigmoid_router_does_not_empty_a_layer():
    model = tiny_model("deepseek_v3", num_layers=4, n_group=1, topk_group=1)
    adapter = get_adapter(model)
    with torch.no_grad():  # layer 2's sigmoid scores near 0.5 everywhere: by raw sums it would outweigh the others
        router = adapter.router(adapter.moe_block(model.model.layers[2]))
        router.weight.mul_(0.01)
    result = compress(model, method="soft_count", ratio=0.25, budget="global", calib=token_batches(count=2), cache_dir=False)
    counts = result.plan.kept_counts()
    for layer in result.plan.layers:  # each layer's scores are a distribution: they sum to 1
        assert sum(layer.scores) == pytest.approx(1.0)
    assert sum(counts.values()) == 18 and min(counts.values()) >= 2


def test_mone_global_scope_compares_raw_scores_by_default():
    model = tiny_model("mixtral")
    request_scores = {0: torch.tensor([4.0, 3.0, 2.0, 1.0]), 1: torch.tensor([40.0, 30.0, 20.0, 10.0])}
    stats = {layer: {
        "tokens": torch.ones(4, dtype=torch.float64),
        "gate_sum": s.double(),  # a = s, v = 1 (one token per expert with unit variance in one dimension)
        "output_moments": torch.cat([torch.full((4, 1), 2.0), torch.zeros(4, 1), torch.full((4, 1), 2.0)], dim=1).double(),
    } for layer, s in request_scores.items()}
    mone = get_method("mone")
    raw = mone.make_plan(PlanRequest(get_adapter(model), model.config, stats, 0.25, "global"), {**NO_GUARD, "variance": "exact"})
    shares = mone.make_plan(PlanRequest(get_adapter(model), model.config, stats, 0.25, "global"),
                            {**NO_GUARD, "global_scores": "layer_normalised", "variance": "exact"})
    assert raw.kept_counts() == {0: 2, 1: 4}, "raw scores: the layer with the larger outputs keeps all"
    assert shares.kept_counts() == {0: 3, 1: 3}, "layer shares: both layers lose their least share"


def test_mone_threshold_removes_experts_tied_with_the_boundary():
    kept = {0: [0, 1, 2, 3, 4, 5]}
    scores = {0: torch.tensor([5.0, 4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])}  # boundary (best removed) = 0
    assert remove_boundary_ties(kept, scores, per_layer=True, floor=2) == {0: [0, 1, 2]}
    assert remove_boundary_ties(kept, scores, per_layer=True, floor=4) == kept, "never below the floor"
    both = {0: [0, 1], 1: [0, 1]}
    global_scores = {0: torch.tensor([3.0, 2.0, 1.0]), 1: torch.tensor([5.0, 1.0, 0.5])}
    # one boundary for the model: the best removed score is 1.0 (layer 0), so layer 1's expert 1 (1.0) goes too
    assert remove_boundary_ties(both, global_scores, per_layer=False, floor=1) == {0: [0, 1], 1: [0]}


def test_mone_running_variance_replays_the_authors_estimate():
    # Expert 0 sees [1, 3], then [5], then [3]; expert 1 only [0, 4] in the second batch (H = 1).
    # Authors: call 1 sets mean 2 and adds no fluctuation; call 2: mean 3, fluc = (5 - 3)^2 / 3 = 4/3;
    # call 3: mean 3, fluc = 4/3 * (3 - 1) / (3 + 1 - 1) + 0 = 8/9. Expert 1's only call adds nothing.
    per_batch = torch.tensor([
        [[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]],
        [[1.0, 5.0, 0.0], [2.0, 2.0, 8.0]],
        [[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]],
    ], dtype=torch.float64)
    torch.testing.assert_close(running_variation(per_batch), torch.tensor([math.sqrt(8 / 9), 0.0], dtype=torch.float64))
    # the exact population std of [1, 3, 5, 3] would be sqrt(2)
