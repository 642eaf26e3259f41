"""Expert pruning surgery: identities that must hold exactly.

Ratio 0 and pruning never-selected experts run for every supported model type in the family
battery (tests/test_families.py); here are the budget, shape and weight-level checks.
"""

from __future__ import annotations

import pytest
import torch

from helpers import selected_experts, token_batches
from moe_compress import KeepLayer, Plan, compress, get_adapter, prune_experts
from moe_compress.methods.expert_pruning import routing_limits
from moe_compress.surgery import experts_per_layer
from tiny_models import FAMILIES, VOCAB, tiny_model

def _plan_keeping(model, adapter, keep: dict[int, list[int]]) -> Plan:
    limits = routing_limits(adapter, model.config)
    return Plan(
        model_type=adapter.model_type,
        top_k=limits.top_k,
        layers=[KeepLayer(layer=layer, num_experts=adapter.num_experts(adapter.moe_block(adapter.decoder_layers(model)[layer])), keep=experts) for layer, experts in keep.items()],
        routing_groups=limits.groups,
        groups_per_token=limits.groups_per_token,
        min_per_group=limits.min_per_group,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_with_a_global_budget_reproduces_logits_exactly(family):
    """The layer budget is part of the family battery (tests/test_families.py) for every type."""
    model = tiny_model(family)
    inputs = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(inputs).logits
    result = compress(model, method="reap", ratio=0.0, budget="global", calib=token_batches(), cache_dir=False)
    assert result.plan.is_identity()
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, before)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_unused_experts_exact_with_renormalised_gates(family):
    model = tiny_model(family, norm_topk_prob=True)
    adapter = get_adapter(model)
    inputs = torch.randint(3, VOCAB, (1, 3))
    used = selected_experts(model, adapter, inputs)
    with torch.no_grad():
        before = model(inputs).logits
    prune_experts(model, _plan_keeping(model, adapter, {layer: sorted(e) for layer, e in used.items()}), adapter)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_model_has_the_planned_shapes(family):
    model = tiny_model(family)
    result = compress(model, method="frequency", ratio=0.5, budget="layer", calib=token_batches(), cache_dir=False)
    adapter = get_adapter(model)
    assert experts_per_layer(model, adapter) == result.plan.kept_counts()
    assert adapter.config_num_experts(model.config) == 4 and not hasattr(model.config, "moe_compress")
    for layer in result.plan.layers:
        block = adapter.moe_block(adapter.decoder_layers(model)[layer.layer])
        for tensor in adapter.expert_tensors(block):
            assert tensor.value.shape[tensor.axis] == 4
    assert result.summary["params_after"] < result.summary["params_before"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, VOCAB, (1, 8))).logits).all()


def test_kept_experts_keep_their_weights_bit_for_bit():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    original = adapter.experts(adapter.moe_block(model.model.layers[1])).down_proj.detach().clone()
    router = adapter.router(adapter.moe_block(model.model.layers[1])).weight.detach().clone()
    keep = {0: list(range(8)), 1: [1, 4, 6], 2: list(range(8))}
    prune_experts(model, _plan_keeping(model, adapter, keep), adapter)
    block = adapter.moe_block(model.model.layers[1])
    assert torch.equal(adapter.experts(block).down_proj, original[[1, 4, 6]])
    assert torch.equal(adapter.router(block).weight, router[[1, 4, 6]])
    assert {k: v["experts"] for k, v in model.config.moe_compress["layers"].items()} == {"0": 8, "1": 3, "2": 8}
    assert {k: v["router"] for k, v in model.config.moe_compress["layers"].items()} == {"0": 8, "1": 3, "2": 8}
