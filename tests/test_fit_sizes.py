"""fit.sizes: predicted bytes from config + headers == the bytes real prune / quantize runs save."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import tensor_bytes

from moe_compress import KeepLayer, MoECompressError, Plan, Quantize, compress, quantize
from moe_compress.stages.footprint import Footprint
from moe_compress.stages.sizes import candidate_bytes, checkpoint_sizes, packed_weight_bytes
from moe_compress.source.load import BUNDLED_MODELS
from moe_compress.methods.expert_pruning import routing_limits
from moe_compress.preflight import skeleton
from tiny_checkpoints import save_tiny_checkpoint
from tiny_models import FAMILIES

MODELS = ["ref-mixtral", "ref-deepseek"]


@pytest.fixture(scope="module", params=MODELS)
def sizes(request):
    return request.param, checkpoint_sizes(request.param)


def test_unchanged_model_is_its_checkpoint(sizes):
    name, found = sizes
    assert found.total == tensor_bytes(BUNDLED_MODELS / name)
    assert found.fixed + sum(candidate_bytes(layer, layer.experts, 16) for layer in found.layers.values()) == found.total


def test_parts_by_hand():
    """ref-mixtral: an expert is w1, w3 [384, 192] and w2 [192, 384] in bf16, its router row 192 bf16;
    ref-deepseek: gate/up [96, 192] and down [192, 96], router row 192 bf16 + a float32 correction bias."""
    mixtral, deepseek = checkpoint_sizes("ref-mixtral"), checkpoint_sizes("ref-deepseek")
    assert sorted(mixtral.layers) == [0, 1, 2, 3, 4, 5] and sorted(deepseek.layers) == [1, 2, 3, 4, 5]  # deepseek's layer 0 is dense
    assert (mixtral.layers[0].expert_bytes[16], mixtral.layers[0].router_per_expert, mixtral.group_size) == (3 * 384 * 192 * 2, 192 * 2, 64)
    assert (deepseek.layers[1].expert_bytes[16], deepseek.layers[1].router_per_expert, deepseek.group_size) == (3 * 96 * 192 * 2, 192 * 2 + 4, 32)
    # 4 bits, groups of 64: packed int32 (384 x 192 x 4 / 32 words) + bf16 scales (384 x 3) + an int64 [2] shape, per matrix
    per_matrix = 384 * 24 * 4 + 384 * 3 * 2 + 16
    assert mixtral.layers[0].expert_bytes[4] == 2 * per_matrix + (192 * 48 * 4 + 192 * 6 * 2 + 16)
    # a whole mixtral block: 8 experts + router + attention (q, o [192, 192]; k, v [64, 192]) + two norms, all bf16
    assert mixtral.blocks == dict.fromkeys(range(6), 8 * 3 * 384 * 192 * 2 + 8 * 192 * 2 + (2 * 192 * 192 + 2 * 64 * 192) * 2 + 2 * 192 * 2)


def test_packed_weight_bytes_by_hand():
    assert packed_weight_bytes((384, 192), 4, 64, 2) == 384 * 24 * 4 + 384 * 3 * 2 + 16
    assert packed_weight_bytes((384, 192), 4, 64, 2, symmetric=False) == 384 * 24 * 4 + 384 * 3 * 2 + 16 + 48 * 3 * 4
    assert packed_weight_bytes((10, 33), 3, 0, 4) == 10 * 4 * 4 + 10 * 4 + 16  # 99 bits a row -> 4 words; one scale a row


def _prune_alternately(model, found, out: Path) -> int:
    """Prune with a plan -- even MoE layers keep every other expert, odd ones all but the last of each
    routing group (so group-limited routers keep their groups balanced) -- and return the predicted bytes."""
    structure = skeleton(model)
    limits = routing_limits(structure.adapter, structure.model.config)
    keeps = {}
    for n, (index, layer) in enumerate(sorted(found.layers.items())):
        size = layer.experts // limits.groups
        keeps[index] = [e for e in range(layer.experts) if (e % size != size - 1 if n % 2 else e % 2 == 0)]
    plan = Plan(model_type=structure.adapter.model_type, top_k=limits.top_k, layers=[KeepLayer(layer=i, num_experts=found.layers[i].experts, keep=k) for i, k in keeps.items()],
                routing_groups=limits.groups, groups_per_token=limits.groups_per_token, min_per_group=limits.min_per_group)
    compress(model, plan=plan, out=out, ignore_plan_identity=True)  # a plan built in code carries no identity
    return found.fixed + sum(candidate_bytes(found.layers[i], len(k), 16) for i, k in keeps.items())


@pytest.mark.parametrize("name", MODELS)
def test_prune_saves_the_predicted_bytes(name, tmp_path):
    """A non-uniform prune: tensor bytes exactly as predicted."""
    found = checkpoint_sizes(name)
    predicted = _prune_alternately(name, found, tmp_path / "pruned")
    assert tensor_bytes(tmp_path / "pruned") == predicted < found.total


@pytest.mark.parametrize("family", FAMILIES)
def test_every_router_shape(family, tmp_path):
    """One tiny checkpoint per router shape (shared-expert gates, correction biases, Ernie's [1, E]
    statistics, gpt_oss's fused 3-D experts that quantize stores unpacked): unchanged, pruned and
    4-bit sizes exactly as predicted."""
    source = save_tiny_checkpoint(tmp_path / "source", family)
    found = checkpoint_sizes(source)
    assert found.total == tensor_bytes(source)
    predicted = _prune_alternately(source, found, tmp_path / "pruned")
    assert tensor_bytes(tmp_path / "pruned") == predicted < found.total
    quantize(source, tmp_path / "q", bits=4, scope="experts")
    assert tensor_bytes(tmp_path / "q") == found.fixed + sum(candidate_bytes(layer, layer.experts, 4) for layer in found.layers.values())


@pytest.mark.parametrize("name, bits, symmetric", [("ref-mixtral", 4, True), ("ref-deepseek", 4, True), ("ref-mixtral", 8, False), ("ref-deepseek", 8, False)])
def test_quantize_saves_the_predicted_bytes(name, bits, symmetric, tmp_path):
    """Routed experts quantised (compressed-tensors pack-quantized, the quantizer's default group size):
    tensor bytes exactly as predicted, zero points included when asymmetric."""
    found = checkpoint_sizes(name, symmetric=symmetric)
    quantize(name, tmp_path / "q", bits=bits, scope="experts", symmetric=symmetric)
    predicted = found.fixed + sum(candidate_bytes(layer, layer.experts, bits) for layer in found.layers.values())
    assert tensor_bytes(tmp_path / "q") == predicted


def test_candidate_bytes_refusals(sizes):
    _, found = sizes
    layer = next(iter(found.layers.values()))
    with pytest.raises(MoECompressError, match=rf"MoE layer {layer.layer} has {layer.experts} routed experts; cannot keep {layer.experts + 1}"):
        candidate_bytes(layer, layer.experts + 1, 16)
    with pytest.raises(MoECompressError, match=r"bit width must be one of 16, 8, 4; got 3"):
        candidate_bytes(layer, 1, 3)
    assert candidate_bytes(layer, 0, 4) == layer.router_fixed


@pytest.mark.parametrize("name, expert_bits", [("ref-deepseek", {1: 8, 3: 16}), ("ref-mixtral", None)])
def test_scope_all_saves_the_predicted_bytes(name, expert_bits, tmp_path):
    """Quantize's scope "all" (attention, shared experts and dense MLPs packed too, at the experts' group size):
    predicted exactly, with per-layer expert widths beside it; by hand, the other weights' bytes of ref-mixtral's
    first block: q/k/v/o [192, 192], [64, 192], [64, 192], [192, 192] bf16 = 196,608 bytes, at 4 bits with groups of 64
    each [out, in] weighs out x in/8 + out x 3 x 2 + 16."""
    found = checkpoint_sizes(name)
    stage = Quantize(bits=4, scope="all", expert_bits=expert_bits)
    footprint = stage.predict(Footprint.of(found))
    quantize(name, tmp_path / "q", **stage.settings())
    assert footprint.exact and footprint.other_bits == 4 and tensor_bytes(tmp_path / "q") == footprint.bytes
    if name == "ref-mixtral":
        shapes = [(192, 192), (64, 192), (64, 192), (192, 192)]
        assert found.others[0] == {16: sum(o * i * 2 for o, i in shapes), 8: sum(o * i + o * 3 * 2 + 16 for o, i in shapes),
                                   4: sum(o * i // 2 + o * 3 * 2 + 16 for o, i in shapes)} == {16: 196608, 8: 101440, 4: 52288}


def test_scope_all_where_the_group_does_not_divide_every_width_is_an_estimate(tmp_path):
    """tiny qwen2_moe: its shared expert is 24 wide, the experts' group 16 does not divide it, so scope "all" would pack
    at another group: the sizes do not price those weights and the prediction says it is an estimate."""
    source = save_tiny_checkpoint(tmp_path / "source", "qwen2_moe")
    found = checkpoint_sizes(source)
    assert found.group_size == 16 and found.others == {}
    assert not Quantize(bits=4, scope="all").predict(Footprint.of(found)).exact
