"""MoNE in the expert-substitution format (vLLM PR #50415 / llm-compressor PR #2906): what the checkpoint holds,
that its config block is exactly the format's schema, that it reloads with identical logits, and its size."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import moe_compress as mc
from helpers import assert_reloads_exactly, load_in_fresh_process, save_expected, tensor_bytes, token_batches
from moe_compress import KeepLayer, Plan, get_adapter
from moe_compress.errors import MoECompressError
from tiny_models import VOCAB, tiny_model

FAMILIES = ("mixtral", "deepseek_v3")
BUDGETS = ("layer", "global")
SUBSTITUTION = {"output_format": "expert-substitution"}
#: The experts module of decoder layer i as the family's checkpoints name it (what vLLM's module prefix is).
EXPERTS = {"mixtral": "model.layers.{}.block_sparse_moe.experts", "deepseek_v3": "model.layers.{}.mlp.experts"}
BLOCK = {"mixtral": "model.layers.{}.block_sparse_moe", "deepseek_v3": "model.layers.{}.mlp"}


def _tensors(path) -> dict[str, torch.Tensor]:
    """The model's weights (not the plan's novice vectors saved beside it)."""
    found = {}
    for shard in path.glob("model*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            found.update({key: handle.get_tensor(key) for key in handle.keys()})
    return found


def _weight_bytes(path) -> int:
    return sum(t.nbytes for t in _tensors(path).values())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per family and budget: the substitution output, the default MoNE output of the same plan, and a plain
    prune keeping the same experts; the substitution outputs loaded once in a fresh process."""
    root = tmp_path_factory.mktemp("substitution")
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    jobs, models, plans = [], {}, {}
    for family in FAMILIES:
        for budget in BUDGETS:
            name = f"{family}-{budget}"
            model = tiny_model(family)
            result = mc.compress(model, method="mone", ratio=0.5, budget=budget, calib=token_batches(), out=root / name, cache_dir=False,
                                 options=SUBSTITUTION)
            save_expected(root / name, inputs, model)
            jobs.append({"path": str(root / name), "remote": True})
            models[name], plans[name] = model, result.plan
            default = mc.compress(tiny_model(family), method="mone", ratio=0.5, budget=budget, calib=token_batches(),
                                  out=root / f"{name}-pruned-form", cache_dir=False)  # MoNE's default output
            assert default.plan.layers == result.plan.layers
    # a plain prune keeping the same experts (Mixtral, layer budget: 4 of 8 kept everywhere, a valid plain plan)
    plan = plans["mixtral-layer"]
    kept = Plan(model_type=plan.model_type, top_k=plan.top_k, method="keep",
                layers=[KeepLayer(layer=lp.layer, num_experts=lp.num_experts, keep=lp.keep) for lp in plan.layers])
    mc.compress(tiny_model("mixtral"), plan=kept, out=root / "mixtral-layer-plain", ignore_plan_identity=True)
    return root, load_in_fresh_process(jobs), models, plans


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_substitution_output_reloads_with_identical_logits_to_the_in_memory_mone_model(saved, family, budget):
    root, results, _, _ = saved
    result = results[str(root / f"{family}-{budget}")]
    assert result["class"].startswith("MoECompressSubstituted")
    assert_reloads_exactly(result)
    assert result["equal"], "the same tensors in the same modules: bit-identical logits"


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_config_declares_the_substitution_in_the_formats_schema(saved, family, budget):
    root, _, _, plans = saved
    config = json.loads((root / f"{family}-{budget}" / "config.json").read_text())
    # the family's own identity, which serving engines pick their model by; our code for transformers beside it
    assert config["model_type"] == family and config["architectures"] == [type(tiny_model(family)).__name__]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe_compress.MoECompressSubstitutedForCausalLM"
    assert list(config["compression_config"]) == ["transform_config"]
    assert list(config["compression_config"]["transform_config"]) == ["expert_substitution"]
    block = config["compression_config"]["transform_config"]["expert_substitution"]
    assert set(block) == {"version", "router_semantics", "targets"} and block["version"] == 1
    assert block["router_semantics"] == {"preserve_logical_expert_ids": True, "preserve_router_weights": True, "renormalize_after_substitution": False}
    substituted = {lp.layer: lp.removed for lp in plans[f"{family}-{budget}"].layers if lp.removed}
    assert substituted, "the plan replaces experts"
    assert set(block["targets"]) == {EXPERTS[family].format(layer) for layer in substituted}
    for layer, removed in substituted.items():
        target = block["targets"][EXPERTS[family].format(layer)]
        assert set(target) == {"num_logical_experts", "weight_layout", "replacements"}
        assert target["num_logical_experts"] == 8 and target["weight_layout"] == "compact_retained_experts"
        assert target["replacements"] == {
            str(e): {"format": "constant-v1", "tensors": {"value": f"{BLOCK[family].format(layer)}.expert_replacements.{e}.value"}} for e in removed
        }
        # vLLM finds a target's layer as the only integer of its path
        assert [int(p) for p in EXPERTS[family].format(layer).split(".") if p.isdigit()] == [layer]


@pytest.mark.parametrize("family", FAMILIES)
def test_full_routers_retained_experts_under_original_ids_and_constants_as_named(saved, family):
    root, _, models, plans = saved
    tensors = _tensors(root / f"{family}-global")
    model, plan = models[f"{family}-global"], plans[f"{family}-global"]
    adapter = get_adapter(model)
    assert not [k for k in tensors if k.endswith(("novice_vectors", "expert_slot"))]
    projection = "w2" if family == "mixtral" else "down_proj"
    for lp in plan.layers:
        experts = EXPERTS[family].format(lp.layer)
        stored = sorted({int(k[len(experts) + 1 :].split(".")[0]) for k in tensors if k.startswith(experts + ".")})
        assert stored == sorted(lp.keep)
        assert tensors[f"{BLOCK[family].format(lp.layer)}.gate.weight"].shape[0] == 8  # every router row
        block = adapter.moe_block(adapter.decoder_layers(model)[lp.layer])
        in_memory = adapter.experts(block)
        for slot, expert in enumerate(sorted(lp.keep)):
            assert torch.equal(tensors[f"{experts}.{expert}.{projection}.weight"], in_memory.down_proj[slot])
        for row, expert in enumerate(lp.removed):
            value = tensors[f"{BLOCK[family].format(lp.layer)}.expert_replacements.{expert}.value"]
            assert value.shape == (model.config.hidden_size,)
            assert torch.equal(value, in_memory.novice_vectors[row])


@pytest.mark.parametrize("family", FAMILIES)
def test_size_against_mones_default_output(saved, family):
    """The same tensors less the slot maps (8 int64 per substituted layer): MoNE's default output keeps full routers too."""
    root, _, _, plans = saved
    substituted = [lp for lp in plans[f"{family}-global"].layers if lp.removed]
    assert _weight_bytes(root / f"{family}-global") == _weight_bytes(root / f"{family}-global-pruned-form") - 8 * 8 * len(substituted)
    assert tensor_bytes(root / f"{family}-global") == tensor_bytes(root / f"{family}-global-pruned-form") - 8 * 8 * len(substituted)


def test_size_against_a_plain_prune_of_the_same_experts(saved):
    """Plus, per removed expert, its router row and its constant (both [hidden])."""
    root, _, models, plans = saved
    removed = sum(len(lp.removed) for lp in plans["mixtral-layer"].layers)
    model = models["mixtral-layer"]
    extra = removed * 2 * model.config.hidden_size * model.dtype.itemsize
    assert _weight_bytes(root / "mixtral-layer") == _weight_bytes(root / "mixtral-layer-plain") + extra


def test_streamed_run_writes_the_same_bytes(tmp_path):
    import filecmp

    tiny_model("qwen2_moe").save_pretrained(tmp_path / "source")
    for streaming in (True, False):
        mc.compress(tmp_path / "source", "mone", 0.5, "global", token_batches(), out=tmp_path / str(streaming), cache_dir=False,
                    streaming=streaming, options=SUBSTITUTION)
    for name in ("config.json", "model.safetensors", "modeling_moe_compress.py"):
        assert filecmp.cmp(tmp_path / "True" / name, tmp_path / "False" / name, shallow=False), name


def test_moe_compress_loads_its_substitution_output_without_the_flag_and_saves_it_to_the_same_bytes(saved, tmp_path):
    import filecmp

    root, _, _, _ = saved
    model, _ = mc.load_model(root / "mixtral-layer")
    assert type(model).__name__ == "MoECompressSubstitutedMixtralForCausalLM"
    mc.save_compressed(model, tmp_path / "again")
    for name in ("config.json", "model.safetensors", "modeling_moe_compress.py", "moe_compress_runtime.py"):
        assert filecmp.cmp(root / "mixtral-layer" / name, tmp_path / "again" / name, shallow=False), name


def test_an_edited_substitution_block_is_refused(saved, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    edited = shutil.copytree(saved[0] / "mixtral-layer", tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    config["compression_config"]["transform_config"]["expert_substitution"]["router_semantics"]["renormalize_after_substitution"] = True
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expert_substitution does not match its moe_compress structure"):
        AutoModelForCausalLM.from_pretrained(edited, trust_remote_code=True)


def test_plain_transformers_refuses_it_rather_than_load_random_experts(saved):
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(saved[0] / "mixtral-layer")


def test_families_storing_fused_experts_and_unknown_formats_are_refused():
    with pytest.raises(MoECompressError, match="gpt_oss stores its routed experts fused on disk"):
        mc.compress(tiny_model("gpt_oss"), method="mone", ratio=0.5, calib=token_batches(), cache_dir=False, options=SUBSTITUTION)
    with pytest.raises(MoECompressError, match="output_format must be one of pruned, expert-substitution"):
        mc.compress(tiny_model("mixtral"), method="mone", ratio=0.5, calib=token_batches(), cache_dir=False, options={"output_format": "vllm"})
