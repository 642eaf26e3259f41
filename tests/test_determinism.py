"""Plans and statistics do not depend on the thread count or on the order tokens are summed in (issue 20 item 8)."""

from __future__ import annotations

import pytest
import torch

from moe_compress.engine.statistics import collect_statistics
from moe_compress.arch import get_adapter
from moe_compress.data import CalibrationSpec
from moe_compress.data.batches import calibration_batches
from moe_compress.source import load_model
from moe_compress.methods import PlanRequest, get_method
from moe_compress.methods.budget import select_experts
from moe_compress.methods.criteria import layer_scores
from moe_compress.walk.routed_batch import RoutedBatch
from moe_compress.walk.statistics import LayerAccumulator
from moe_compress.plan import RoutingLimits

METHODS = ("reap", "ean", "mone")


def _statistics_at(threads: int, model, batches, names) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return collect_statistics(model, batches, names, cache_dir=False, superset=False)[0]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["ref-mixtral", "ref-deepseek"])
def test_one_and_two_threads_give_the_same_statistics_and_plans(name):
    """float32 (where MKL's GEMM for a few rows once depended on the thread count): same statistics, same plans.

    Before the fix, ref-deepseek's statistics differed by up to 2e-9 relative between 1 and 2 threads.
    """
    model, tokenizer = load_model(name, dtype="float32")
    adapter = get_adapter(model)
    batches = calibration_batches(tokenizer, CalibrationSpec(samples=8, seq_len=64, batch_size=2))
    names = tuple(sorted({s for m in METHODS for s in get_method(m).needs(None)}))
    one, two = (_statistics_at(threads, model, batches, names) for threads in (1, 2))
    for layer, named in one.items():
        for stat, value in named.items():
            torch.testing.assert_close(two[layer][stat], value, rtol=1e-12, atol=0, msg=lambda m: f"{name} layer {layer} {stat}: {m}")
    for method in METHODS:
        for budget in ("layer", "global"):
            plans = [get_method(method).make_plan(PlanRequest(adapter, model.config, stats, 0.25, budget), None) for stats in (one, two)]
            assert [lp.keep for lp in plans[0].layers] == [lp.keep for lp in plans[1].layers], f"{method} {budget}"
            assert [lp.layer for lp in plans[0].layers] == sorted(one)


def _batch(top_idx: torch.Tensor, token_outputs: torch.Tensor, experts: int) -> RoutedBatch:
    """A routed batch from each token's chosen experts [N, k] and their outputs [N, k, H] (weights 1/k)."""
    order = torch.sort(top_idx.reshape(-1), stable=True).indices
    tokens, hidden = token_outputs.shape[0], token_outputs.shape[-1]
    return RoutedBatch(
        x=torch.zeros(tokens, hidden),
        logits=torch.zeros(tokens, experts),
        top_idx=top_idx,
        top_w=torch.full(top_idx.shape, 1.0 / top_idx.shape[1]),
        adapter=None,
        experts=None,
        pair_outputs=token_outputs.reshape(-1, hidden)[order],
    )


def test_reap_orders_a_near_tie_that_float32_norms_round_together():
    """Expert 0's output norm exceeds expert 1's by 3e-9 (relative 6e-10): a float32 norm makes both exactly 5,
    the tie rule then removed expert 0; in float64 the smaller expert, 1, is removed."""
    top_idx = torch.tensor([[0], [1]])
    outputs = torch.tensor([[[3.0, 4.0, 2.0**-12]], [[3.0, 4.0, 0.0]]])
    accumulator = LayerAccumulator(("reap_sum", "selected"))
    accumulator.update(_batch(top_idx, outputs, experts=2))
    scores = layer_scores("reap", {0: accumulator.sums})
    assert scores[0][0] > scores[0][1] == 5.0
    assert select_experts(scores, 0.5, "layer", RoutingLimits(1)) == {0: [0]}


def test_output_moments_do_not_depend_on_the_order_tokens_arrive_in():
    """MoNE's moments of the same routed outputs in two token orders (as another split of the work sums them)
    agree to 1e-12, and equal a float64 reference; float32 sums differed by ~1e-7 relative."""
    generator = torch.Generator().manual_seed(0)
    tokens, experts, hidden = 3000, 3, 16
    top_idx = torch.randint(0, experts, (tokens, 1), generator=generator)
    outputs = (10 + 0.01 * torch.randn(tokens, 1, hidden, generator=generator)).float()
    permutation = torch.randperm(tokens, generator=generator)
    moments = []
    for idx, out in ((top_idx, outputs), (top_idx[permutation], outputs[permutation])):
        accumulator = LayerAccumulator(("output_moments",))
        accumulator.update(_batch(idx, out, experts))
        moments.append(accumulator.sums["output_moments"])
    torch.testing.assert_close(moments[1], moments[0], rtol=1e-12, atol=0)
    for e in range(experts):
        routed = outputs[top_idx[:, 0] == e, 0].double()
        reference = torch.cat([torch.tensor([len(routed)], dtype=torch.float64), routed.mean(0), ((routed - routed.mean(0)) ** 2).sum(0)])
        torch.testing.assert_close(moments[0][e], reference, rtol=1e-12, atol=0)
