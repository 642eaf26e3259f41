"""MoNE: moments, fused redundancy and novices against hand-computed values; identities."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import token_batches
from moe_compress import MoECompressError, NoviceLayer, Plan, compress, get_adapter, load_model, prune_experts
from moe_compress.sink.save import save_compressed
from moe_compress.engine.statistics import collect_statistics
from moe_compress.methods.mone import access_and_variance, redundancy
from moe_compress.walk.moments import merge_moments, split_moments
from tiny_models import FAMILIES, VOCAB, tiny_model


def _moments(outputs: torch.Tensor) -> torch.Tensor:
    mean = outputs.mean(0)
    return torch.cat([torch.tensor([outputs.shape[0]], dtype=torch.float64), mean, ((outputs - mean) ** 2).sum(0)])[None]


def test_pairwise_moments_equal_direct_computation():
    torch.manual_seed(0)
    data = (torch.randn(1000, 4, dtype=torch.float64) * 1e-3 + 1e4)  # large mean, tiny spread
    merged = _moments(data[:1])
    for chunk in data[1:].split(37):
        merged = merge_moments(merged, _moments(chunk))
    count, mean, variance = split_moments(merged)
    assert count.item() == 1000
    torch.testing.assert_close(mean[0], data.mean(0), rtol=0, atol=1e-9)
    torch.testing.assert_close(variance[0], data.var(0, unbiased=False), rtol=1e-6, atol=0)


def test_fused_redundancy_and_novice_hand_computed():
    # Expert 0 saw outputs [1, 2] and [3, 2]; expert 1 saw [0, 0] only; 4 tokens in all.
    out0 = torch.tensor([[1.0, 2.0], [3.0, 2.0]], dtype=torch.float64)
    out1 = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    stats = {
        "tokens": torch.tensor([4.0, 4.0], dtype=torch.float64),
        "gate_sum": torch.tensor([1.2, 0.4], dtype=torch.float64),
        "output_moments": torch.cat([_moments(out0), _moments(out1)]),
    }
    access, variance, novices = access_and_variance(stats)
    torch.testing.assert_close(access, torch.tensor([0.3, 0.1], dtype=torch.float64))
    # per-dim population std of expert 0: [1, 0] -> L2 norm 1; expert 1: 0
    torch.testing.assert_close(variance, torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(novices, torch.tensor([[2.0, 2.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(redundancy(access, variance, "product"), torch.tensor([0.3, 0.0], dtype=torch.float64))
    a, v = torch.tensor([0.1, 0.3, 0.2]), torch.tensor([4.0, 2.0, 3.0])
    # min-max: a -> [0, 1, .5], v -> [1, 0, .5]
    torch.testing.assert_close(redundancy(a, v, "minmax_product"), torch.tensor([0.0, 0.0, 0.25]))
    torch.testing.assert_close(redundancy(a, v, "weighted_sum", 0.25), torch.tensor([0.75, 0.25, 0.5]))


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_expert_is_an_identity(family):
    model = tiny_model(family)
    inputs = torch.randint(3, VOCAB, (2, 10))
    with torch.no_grad():
        before = model(inputs).logits
    result = compress(model, method="mone", ratio=0.0, calib=token_batches(), cache_dir=False)
    assert result.plan.is_identity()
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, before)


def _make_expert_constant(model, expert: int) -> None:
    """gpt_oss experts have biases: zero input weights make f_e(x) a non-zero constant."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for index in adapter.moe_layer_indices(model):
            experts = adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[index]))
            experts.gate_up_proj[expert].zero_()
            experts.gate_up_proj_bias[expert].uniform_(0.5, 1.0)


def test_novice_reproduces_an_expert_whose_output_is_constant():
    model = tiny_model("gpt_oss")
    _make_expert_constant(model, 3)
    adapter = get_adapter(model)
    inputs = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(inputs).logits
    stats, _ = collect_statistics(model, token_batches(), ("gate_sum", "output_moments"), cache_dir=False)
    plan = Plan(model_type="gpt_oss", top_k=2, layers=[NoviceLayer(layer=i, num_experts=8, keep=[e for e in range(8) if e != 3]) for i in stats])
    for index, layer_stats in stats.items():
        count, mean, variance = split_moments(layer_stats["output_moments"])
        assert count[3] > 0 and variance[3].max() < 1e-10, "the constructed expert must be constant"
        plan.novice_vectors[index] = mean[3:4].float()
    prune_experts(model, plan, adapter)
    block = adapter.moe_block(adapter.decoder_layers(model)[0])
    assert adapter.num_experts(block) == 7 and adapter.router_size(block) == 8
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=1e-5)


def test_novices_beat_zero_vectors_on_the_constant_case():
    """Without novices the same plan loses the constant expert's contribution."""
    model = tiny_model("gpt_oss")
    _make_expert_constant(model, 3)
    inputs = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(inputs).logits
    plan = Plan(model_type="gpt_oss", top_k=2, layers=[NoviceLayer(layer=i, num_experts=8, keep=[e for e in range(8) if e != 3]) for i in (0, 1, 2)])
    prune_experts(model, plan)
    with torch.no_grad():
        assert (model(inputs).logits - before).abs().max() > 1e-3


def test_mone_memory_per_pruned_expert_is_one_vector():
    model = tiny_model("mixtral")
    before = sum(p.numel() for p in model.parameters())
    result = compress(model, method="mone", ratio=0.5, calib=token_batches(), cache_dir=False)
    removed = sum(len(lp.removed) for lp in result.plan.layers)
    expert_params = 3 * model.config.hidden_size * model.config.intermediate_size
    after = sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers() if n.endswith("novice_vectors"))
    assert before - after == removed * (expert_params - model.config.hidden_size)
    assert math.isclose(result.plan.ratio, 0.5)


def test_novice_layer_may_keep_fewer_real_experts_than_top_k(tmp_path):
    """The router keeps every row, so one real expert with seven novices is a working top-2 layer."""
    model = tiny_model("mixtral")
    stats, _ = collect_statistics(model, token_batches(), ("gate_sum", "output_moments"), cache_dir=False)
    plan = Plan(model_type="mixtral", top_k=2, layers=[NoviceLayer(layer=i, num_experts=8, keep=[5]) for i in stats])
    for index, layer_stats in stats.items():
        plan.novice_vectors[index] = split_moments(layer_stats["output_moments"])[1][[e for e in range(8) if e != 5]].float()
    prune_experts(model, plan)
    inputs = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        logits = model(inputs).logits
    assert torch.isfinite(logits).all() and get_adapter(model).num_experts(model.model.layers[0].mlp) == 1
    save_compressed(model, tmp_path / "one-real", plan=plan)
    reloaded, _ = load_model(tmp_path / "one-real")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, logits, rtol=0, atol=1e-5)
    with pytest.raises(MoECompressError, match="keeps no expert"):
        Plan(model_type="mixtral", top_k=2, layers=[NoviceLayer(layer=0, num_experts=8, keep=[])]).validate()
