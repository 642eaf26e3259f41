"""Saved checkpoints reload with identical logits in a process that cannot import moe_compress."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from helpers import assert_reloads_exactly, load_in_fresh_process, save_expected, token_batches
from moe_compress import KeepLayer, Plan, compress, get_adapter, load_model, prune_experts, save_compressed
from moe_compress.methods.expert_pruning import routing_limits
from tiny_models import VOCAB, tiny_model


CPRUNE_FAMILIES = ("mixtral", "qwen2_moe", "gpt_oss")
#: Every supported type saves and reloads in the family battery (tests/test_families.py); the
#: checks of the saved files here run on one family per layout: plain, shared expert with a
#: gate, sigmoid group-limited router with correction bias, transposed experts with biases.
SAVED_FAMILIES = ("mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss")


def _non_uniform_plan(model) -> Plan:
    """First MoE layer keeps 6 experts, the others 4; balanced across two routing groups."""
    adapter = get_adapter(model)
    limits = routing_limits(adapter, model.config)
    layers = adapter.moe_layer_indices(model)
    keeps = [[0, 1, 2, 4, 5, 6]] + [[1, 3, 5, 7]] * (len(layers) - 1)
    return Plan(
        model_type=adapter.model_type, top_k=limits.top_k, layers=[KeepLayer(layer=i, num_experts=8, keep=k) for i, k in zip(layers, keeps)],
        routing_groups=limits.groups, groups_per_token=limits.groups_per_token, min_per_group=limits.min_per_group,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family, a uniform, a non-uniform and a MoNE checkpoint (and C-Prune), loaded once in a fresh process."""
    root = tmp_path_factory.mktemp("checkpoints")
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    jobs = []
    for family in SAVED_FAMILIES:
        uniform = tiny_model(family)
        compress(uniform, method="reap", ratio=0.5, budget="layer", calib=token_batches(), out=root / f"{family}-uniform", cache_dir=False)
        non_uniform = tiny_model(family)
        compress(non_uniform, plan=_non_uniform_plan(non_uniform), out=root / f"{family}-non-uniform", ignore_plan_identity=True)
        novices = tiny_model(family)
        compress(novices, method="mone", ratio=0.5, budget="global", calib=token_batches(), out=root / f"{family}-mone", cache_dir=False)
        variants = [("uniform", uniform), ("non-uniform", non_uniform), ("mone", novices)]
        if family in CPRUNE_FAMILIES:
            clustered = tiny_model(family)
            compress(clustered, method="cprune", ratio=0.5, budget="global", calib=token_batches(), out=root / f"{family}-cprune",
                     cache_dir=False, options={"clusters": 3, "global_clusters": 2})
            variants.append(("cprune", clustered))
        for name, model in variants:
            save_expected(root / f"{family}-{name}", inputs, model)
            jobs.append({"path": str(root / f"{family}-{name}"), "remote": name != "uniform"})
    return root, load_in_fresh_process(jobs)


@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_uniform_plan_saves_a_stock_checkpoint(saved, family):
    root, results = saved
    path = root / f"{family}-uniform"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config and "moe_compress" not in config
    assert not list(path.glob("*.py")), "a stock checkpoint needs no code"
    result = results[str(path)]
    assert result["class"] != "MoECompressForCausalLM"
    assert_reloads_exactly(result)


@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_non_uniform_plan_loads_with_remote_code(saved, family):
    root, results = saved
    path = root / f"{family}-non-uniform"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == f"moe_compress_{family}"
    counts = {k: v["experts"] for k, v in config["moe_compress"]["layers"].items()}
    assert counts == {str(k): v for k, v in _non_uniform_plan(tiny_model(family)).kept_counts().items()}
    result = results[str(path)]
    assert result["class"].startswith("MoECompress")
    assert_reloads_exactly(result)


@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_non_uniform_counts_are_stated_in_transformers_per_layer_config(saved, family):
    """The stock config class reads the per-layer expert counts from the standard schema."""
    from transformers import AutoConfig

    config = json.loads((saved[0] / f"{family}-non-uniform" / "config.json").read_text())
    fields = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures", "moe_compress")}
    stock = AutoConfig.for_model(family, **fields)
    key = get_adapter(tiny_model(family)).num_experts_key
    assert stock.is_heterogeneous and stock.per_layer_attributes == {key}
    kept = _non_uniform_plan(tiny_model(family)).kept_counts()
    assert {i: getattr(stock.per_layer_config[i], key) for i in kept} == kept
    assert len(str(max(int(i) for i in config["per_layer_config"]))) == len(next(iter(config["per_layer_config"])))  # zero-padded as transformers writes


def test_per_layer_config_that_disagrees_with_the_structure_is_refused(saved, tmp_path):
    import shutil

    edited = shutil.copytree(saved[0] / "mixtral-non-uniform", tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    first = next(iter(config["per_layer_config"]))
    config["per_layer_config"][first]["num_local_experts"] += 1
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="per_layer_config states .* but its moe_compress structure describes"):
        AutoModelForCausalLM.from_pretrained(edited, trust_remote_code=True)


@pytest.mark.parametrize("family", SAVED_FAMILIES)
def test_novice_checkpoint_stores_one_vector_per_pruned_expert_and_reloads(saved, family):
    root, results = saved
    path = root / f"{family}-mone"
    spec = json.loads((path / "config.json").read_text())["moe_compress"]
    hidden = tiny_model(family).config.hidden_size
    with safe_open(str(next(path.glob("*.safetensors"))), "pt") as handle:
        vectors = {k: handle.get_slice(k).get_shape() for k in handle.keys() if k.endswith("novice_vectors")}
    assert vectors, "novices must be saved"
    for index, layer in spec["layers"].items():
        assert layer["router"] == 8 and layer["experts"] + len(layer["novices"]) == 8
        key = next(k for k in vectors if f"layers.{index}." in k)
        assert vectors[key] == [len(layer["novices"]), hidden]
    result = results[str(path)]
    assert result["class"].startswith("MoECompress")
    assert_reloads_exactly(result)


@pytest.mark.parametrize("family", CPRUNE_FAMILIES)
def test_cprune_checkpoint_reloads_exactly(saved, family):
    root, results = saved
    result = results[str(root / f"{family}-cprune")]
    assert_reloads_exactly(result)


def test_weights_use_the_family_per_expert_layout(saved):
    root, _ = saved
    for name in ("uniform", "non-uniform"):
        with safe_open(str(next((root / f"mixtral-{name}").glob("*.safetensors"))), "pt") as handle:
            keys = set(handle.keys())
        assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in keys
        assert not any(k.endswith("gate_up_proj") for k in keys)
    assert (root / "mixtral-non-uniform" / "moe_compress_plan.json").is_file()


def test_non_uniform_checkpoint_refuses_to_load_without_trust_remote_code(saved):
    root, _ = saved
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(root / "mixtral-non-uniform")


def test_reloaded_non_uniform_model_can_be_pruned_again(saved, tmp_path):
    """Stages compose: a custom checkpoint is a valid input model for the next stage."""
    root, _ = saved
    model, _ = load_model(root / "qwen2_moe-non-uniform")
    adapter = get_adapter(model)
    assert adapter.model_type == "qwen2_moe"
    plan = Plan(model_type="qwen2_moe", top_k=2, layers=[KeepLayer(layer=1, num_experts=6, keep=[0, 1, 2, 3]), KeepLayer(layer=2, num_experts=4, keep=[0, 1, 2, 3])])
    prune_experts(model, plan, adapter)
    assert not hasattr(model.config, "moe_compress"), "4 and 4 experts is uniform again: a stock checkpoint"
    out = save_compressed(model, tmp_path / "again")
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    reloaded, _ = load_model(out)
    inputs = torch.randint(3, VOCAB, (1, 6))
    # Not bit-exact here: `model` holds tensors memory-mapped from the first checkpoint at
    # unaligned offsets, and BLAS sums a dot product in another order for those (measured
    # 2e-7 on the same weights cloned); the fresh-process tests above compare bit for bit.
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, model(inputs).logits, rtol=0, atol=1e-5)


def test_a_family_whose_config_refuses_our_per_layer_config_declares_none_and_reloads(tmp_path):
    """Dots3 requires every layer of one attention type to share its per-layer overrides, so per-layer
    expert counts there are refused by its own config class: the spec says nothing was declared and
    the checkpoint reloads exactly from `moe_compress` alone."""
    model = tiny_model("dots3_note_text")
    adapter = get_adapter(model)
    limits = routing_limits(adapter, model.config)
    layers = adapter.moe_layer_indices(model)
    half = adapter.num_experts(adapter.moe_block(adapter.decoder_layers(model)[layers[0]])) // 2
    keeps = [[*range(half - 1), *range(half, 2 * half - 1)]] + [[*range(half - 2), *range(half, 2 * half - 2)]] * (len(layers) - 1)
    plan = Plan(model_type=adapter.model_type, top_k=limits.top_k, layers=[KeepLayer(layer=i, num_experts=2 * half, keep=k) for i, k in zip(layers, keeps)],
                routing_groups=limits.groups, groups_per_token=limits.groups_per_token, min_per_group=limits.min_per_group)
    compress(model, plan=plan, out=tmp_path / "out", ignore_plan_identity=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["moe_compress"]["standard_per_layer_config"] is False
    assert not any("num_experts" in values or "skip" in values for values in (config.get("per_layer_config") or {}).values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    assert torch.equal(reloaded(input_ids=inputs).logits, model(input_ids=inputs).logits)
