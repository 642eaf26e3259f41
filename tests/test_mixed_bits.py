"""Mixed precision for the routed experts (`quantize(expert_bits=...)`): per-layer and per-expert widths
written as compressed-tensors config groups, reloaded exactly, predicted to the byte, bad input refused."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.utils.match import match_name
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import moe_compress as mc
from helpers import calm, rounded, token_batches
from moe_compress import MoECompressError, get_adapter, load_model, quantize
from moe_compress.source.checkpoint import Checkpoint
from moe_compress.preflight import skeleton
from moe_compress.stages.footprint import Footprint
from moe_compress.stages.sizes import candidate_bytes, checkpoint_sizes
from tiny_checkpoints import save_tiny_checkpoint
from tiny_models import VOCAB, tiny_model

IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
GROUP = 16


def _widths(model, expert_bits: dict, bits: int) -> dict[int, list[int]]:
    """Each MoE layer's expert widths, spelled out independently of the library."""
    adapter = get_adapter(model)
    widths = {}
    for index in adapter.moe_layer_indices(model):
        count = adapter.num_experts(adapter.moe_block(adapter.decoder_layers(model)[index]))
        named = expert_bits.get(index, bits)
        widths[index] = [named.get(e, bits) if isinstance(named, dict) else named for e in range(count)]
    return widths


@torch.no_grad()
def _round_by_width(model, widths: dict[int, list[int]], bits: int, scope: str) -> None:
    """What the checkpoint should hold: each routed expert rounded at its own width (16: untouched) and,
    with scope "all", every other decoder Linear but routers and gates at `bits`."""
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        if scope == "all":
            skip = {id(adapter.router(block))} if block is not None else set()
            skip |= {id(m) for m in (adapter.shared_experts(block) if block is not None else []) if isinstance(m, nn.Linear)}
            for module in layer.modules():
                if isinstance(module, nn.Linear) and id(module) not in skip:
                    module.weight.copy_(rounded(module.weight, bits, GROUP))
        if block is None:
            continue
        experts = adapter.experts(block)
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            tensor = getattr(experts, name, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            for expert, width in enumerate(widths[index]):
                if width == 16:
                    continue
                if getattr(experts, "is_transposed", False):  # stored [E, in, out]: groups run along the middle axis
                    tensor[expert].copy_(rounded(tensor[expert].T, width, GROUP).T)
                else:
                    tensor[expert].copy_(rounded(tensor[expert], width, GROUP))


def _assert_same_model(reloaded, expected, scope: str) -> None:
    """Every dense tensor equal, and the logits. With scope "all", transformers keeps attention packed
    (compressed-tensors decompresses it on the forward): those weights are not in the state as such."""
    state, wanted = reloaded.state_dict(), expected.state_dict()
    packed = {k for k in wanted.keys() - state.keys() if ".self_attn." in k}
    assert state.keys() - wanted.keys() == {k for k in state if ".self_attn." in k and k not in wanted}
    assert wanted.keys() - state.keys() == packed and bool(packed) == (scope == "all")
    assert [k for k in state.keys() & wanted.keys() if not torch.equal(state[k], wanted[k])] == []
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, expected(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family, scope", [
    ("mixtral", "experts"),  # experts stored per expert, fused in memory by transformers' own conversion
    ("mixtral", "all"),  # attention packed too, by compressed-tensors' Linear path
    ("qwen2_moe", "experts"),  # shared experts beside, a dense first layer
    ("gpt_oss", "experts"),  # fused 3-D and transposed on disk: packed per expert (`sink.per_expert`)
])
def test_mixed_widths_reload_as_the_in_memory_model(family, scope, tmp_path):
    model = calm(tiny_model(family))
    first, second = get_adapter(model).moe_layer_indices(model)[:2]
    expert_bits = {first: 8, second: {0: 16, 3: 8, 5: 4}}
    result = quantize(model, tmp_path / "q", bits=4, group_size=GROUP, scope=scope, expert_bits=expert_bits)
    widths = _widths(model, expert_bits, 4)
    assert result.summary["expert_bits"] == {i: {w: layer.count(w) for w in (16, 8, 4) if w in layer} for i, layer in widths.items()}
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["moe_compress"]["expert_bits"] == {str(i): w for i, w in widths.items()}
    original = {k: v.clone() for k, v in model.state_dict().items()}

    ours, _ = load_model(tmp_path / "q")  # moe-compress recognises its own generated code
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True).eval()
    _round_by_width(model, widths, 4, scope)
    _assert_same_model(ours, model, scope)
    _assert_same_model(plain, model, scope)
    # the widths are honoured: the 16-bit expert is the original, the 8-bit layer is not the 4-bit rounding
    experts = get_adapter(plain).experts(get_adapter(plain).moe_block(get_adapter(plain).decoder_layers(plain)[second]))
    stored = original[f"model.layers.{second}.mlp.experts.down_proj"]
    assert torch.equal(experts.down_proj[0], stored[0]) and not torch.equal(experts.down_proj[1], stored[1])


def _packed_modules(directory) -> dict[str, int]:
    """Every packed module of a checkpoint -> its width, read from the packed shape and the stored weight shape."""
    found = {}
    for shard in directory.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as stored:
            for key in stored.keys():
                if key.endswith(".weight_packed"):
                    module = key.removesuffix(".weight_packed")
                    columns = int(stored.get_tensor(f"{module}.weight_shape")[1])
                    found[module] = stored.get_slice(key).get_shape()[1] * 32 // columns
    return found


def test_config_groups_name_every_module_at_its_width(tmp_path):
    """One group per width, its targets `re:` patterns of the experts at that width (a whole layer as `\\d+`);
    16-bit experts ignored by pattern. Matched the way compressed-tensors matches, every packed module falls in
    exactly the group of its width, and every expert left as stored in `ignore`."""
    quantize(tiny_model("mixtral"), tmp_path / "q", bits=4, group_size=GROUP, scope="experts", expert_bits={0: 8, 1: {0: 16, 3: 8}})
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    prefix = r"re:^model\.layers\.{}\.block_sparse_moe\.experts\."
    groups = {name: (group["weights"]["num_bits"], group["targets"]) for name, group in config["config_groups"].items()}
    assert groups == {
        "group_0": (4, [prefix.format(1) + r"(?:1|2|4|5|6|7)\.", prefix.format(2) + r"\d+\."]),
        "group_1": (8, [prefix.format(0) + r"\d+\.", prefix.format(1) + r"(?:3)\."]),
    }
    assert prefix.format(1) + r"(?:0)\." in config["ignore"]
    assert not [name for name in config["ignore"] if ".experts." in name and not name.startswith("re:")]
    packed = _packed_modules(tmp_path / "q")
    assert len(packed) == 3 * 8 * 3 - 3  # 3 layers x 8 experts x w1/w2/w3, less the 16-bit expert
    for module, width in packed.items():
        matching = [bits for bits, targets in groups.values() if any(match_name(module, t) for t in targets)]
        assert matching == [width], module
        assert not any(match_name(module, name) for name in config["ignore"])
    assert set(packed.values()) == {4, 8}
    for projection in ("w1", "w2", "w3"):
        module = f"model.layers.1.block_sparse_moe.experts.0.{projection}"
        assert module not in packed and any(match_name(module, name) for name in config["ignore"])


def test_widths_that_agree_write_the_uniform_checkpoint(tmp_path):
    """Every expert at 8 bits through expert_bits is the plain 8-bit checkpoint: same tensors, same config, stock classes."""
    model = tiny_model("mixtral")
    quantize(model, tmp_path / "named", bits=4, group_size=GROUP, scope="experts", expert_bits={0: 8, 1: 8, 2: {e: 8 for e in range(8)}})
    quantize(model, tmp_path / "plain", bits=8, group_size=GROUP, scope="experts")
    for name in ["config.json", *(p.name for p in (tmp_path / "plain").glob("*.safetensors"))]:
        assert (tmp_path / "named" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    assert "auto_map" not in json.loads((tmp_path / "named" / "config.json").read_text())


def test_predicted_bytes_of_prune_then_mixed_quantize_are_the_saved_bytes(tmp_path):
    """Per-layer and per-expert widths after a layer-budget prune: `predict` gives exactly the tensor bytes saved."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    composition = [mc.Prune("frequency", ratio=0.25), mc.Quantize(bits=4, scope="experts", expert_bits={1: 8, 2: {0: 16, 2: 8, 5: 16}})]
    footprint = Footprint.of(checkpoint_sizes(str(checkpoint)))
    for stage in composition:
        footprint = stage.predict(footprint)
    assert footprint.keep == {1: 6, 2: 6} and footprint.bits == {1: 8, 2: {16: 2, 8: 1, 4: 3}}
    result = mc.compress(str(checkpoint), composition, calib=token_batches(count=1), out=tmp_path / "out")
    assert footprint.exact and footprint.bytes == Checkpoint(result.output_dir).total_bytes()
    assert footprint.bytes < Footprint.of(checkpoint_sizes(str(checkpoint))).with_keep(footprint.keep).bytes


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_mixed_quantize_saves_the_predicted_bytes(family, tmp_path):
    """Straight from a checkpoint (streamed), per-expert widths on every layer: header bytes as `candidate_bytes` counts them."""
    source = save_tiny_checkpoint(tmp_path / "source", family)
    found = checkpoint_sizes(source)
    expert_bits = {0: {1: 8, 2: 16}, 1: 16, 2: {7: 8}}
    quantize(source, tmp_path / "q", bits=4, scope="experts", expert_bits=expert_bits)
    mixes = {0: {16: 1, 8: 1, 4: 6}, 1: {16: 8}, 2: {8: 1, 4: 7}}
    expected = found.fixed + sum(candidate_bytes(found.layers[i], 8, mix) for i, mix in mixes.items())
    assert Checkpoint(tmp_path / "q").total_bytes() == expected
    assert mc.Quantize(bits=4, scope="experts", expert_bits=expert_bits).predict(Footprint.of(found)).bytes == expected


def test_candidate_bytes_of_a_mix():
    found = checkpoint_sizes("ref-mixtral")
    layer = found.layers[0]
    assert candidate_bytes(layer, 8, {4: 5, 8: 2, 16: 1}) == 5 * layer.expert_bytes[4] + 2 * layer.expert_bytes[8] + layer.expert_bytes[16] + layer.router_bytes
    assert candidate_bytes(layer, 8, {4: 8}) == candidate_bytes(layer, 8, 4)
    with pytest.raises(MoECompressError, match=r"^MoE layer 0 keeps 6 routed experts, but its widths count 8\.$"):
        candidate_bytes(layer, 6, {4: 8})
    with pytest.raises(MoECompressError, match=r"^bit width must be one of 16, 8, 4; got 2\.$"):
        candidate_bytes(layer, 8, {4: 7, 2: 1})


@pytest.mark.parametrize("expert_bits, message", [
    ({1: 3}, r"expert_bits widths must be 4, 8 or 16 \(16: left as stored\); got 3 for layer 1\."),
    ({1: {2: 6}}, r"expert_bits widths must be 4, 8 or 16 \(16: left as stored\); got 6 for layer 1, expert 2\."),
    ({7: 8}, r"expert_bits names layer 7, but the model has 3 decoder layers \(0-2\)\."),
    ({1: {8: 8}}, r"expert_bits names expert 8 of layer 1, which has 8 routed experts \(0-7\)\."),
    ({0: 8}, r"expert_bits names layer 0, which has no routed experts; name MoE layers \(1, 2\)\."),
    ({"1": 8}, r"expert_bits is keyed by decoder layer index \(0, 1, \.\.\.\); got '1'\."),
])
def test_bad_expert_bits_are_refused_in_one_line(expert_bits, message, tmp_path):
    """deepseek_v3's layer 0 is dense. The quantizer refuses before writing; the stage, from the skeleton."""
    model = tiny_model("deepseek_v3")
    with pytest.raises(MoECompressError, match=f"^{message}$"):
        quantize(model, tmp_path / "q", bits=4, expert_bits=expert_bits)
    assert not list(tmp_path.iterdir())
    if not isinstance(next(iter(expert_bits)), str):  # a stage's options are typed: a string key is refused as a type
        with pytest.raises(MoECompressError, match=f"^{message}$"):
            mc.Quantize(bits=4, expert_bits=expert_bits).check(skeleton(save_tiny_checkpoint(tmp_path / "tiny", "deepseek_v3")), [])


def test_expert_bits_need_round_to_nearest_and_typed_options(tmp_path):
    with pytest.raises(MoECompressError, match=r"^expert_bits \(per-layer or per-expert widths\) is written with method 'rtn'; got 'autoround'\.$"):
        quantize(tiny_model("mixtral"), tmp_path / "q", method="autoround", expert_bits={0: 8})
    with pytest.raises(MoECompressError, match=r"option 'expert_bits' must be a mapping or null; got"):
        mc.Quantize(expert_bits={1: "8"})
    with pytest.raises(MoECompressError, match=r"every expert at 16 bits"):
        quantize(tiny_model("mixtral"), tmp_path / "q", scope="experts", expert_bits=dict.fromkeys(range(3), 16))
    assert not list(tmp_path.iterdir())


def test_the_family_s_other_checkpoints_load_as_before_once_a_mixed_one_has(tmp_path):
    """A mixed checkpoint's generated code replaces the family's conversions in the process (see
    `io/templates/mixed_bits.py.tmpl`): checkpoints of the family read before it, one unquantised and one
    at a single width, read the same after it."""
    from test_save_load import _non_uniform_plan

    model = tiny_model("mixtral")
    mc.compress(model, plan=_non_uniform_plan(model), out=tmp_path / "pruned", ignore_plan_identity=True)
    quantize(tmp_path / "pruned", tmp_path / "uniform", bits=8, group_size=GROUP, scope="experts")
    quantize(tmp_path / "pruned", tmp_path / "mixed", bits=4, group_size=GROUP, scope="experts", expert_bits={1: 8})

    def read(name: str) -> dict[str, torch.Tensor]:
        return AutoModelForCausalLM.from_pretrained(tmp_path / name, trust_remote_code=True).state_dict()

    before = {name: read(name) for name in ("pruned", "uniform")}
    read("mixed")
    for name, state in before.items():
        after = read(name)
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state), name
    # and a model of the family loaded after it saves as before: quantising it again writes the same bytes
    quantize(tmp_path / "pruned", tmp_path / "again", bits=8, group_size=GROUP, scope="experts")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "uniform" / "model.safetensors").read_bytes()


def test_checkpoints_in_directories_of_one_name_each_load_with_their_own_code(tmp_path):
    """transformers keys generated code by directory name and file bytes: a mixed-width checkpoint and a
    plain non-uniform one of the same family share their configuration file, hence one config class, and
    its Auto registry built the second with the first's model class (its packed experts then failed to
    convert). Each now loads with its own classes, whichever was read first, and reads the same again."""
    import shutil

    from test_save_load import _non_uniform_plan

    model = tiny_model("mixtral")
    mc.compress(model, plan=_non_uniform_plan(model), out=tmp_path / "a" / "model", ignore_plan_identity=True)
    quantize(tmp_path / "a" / "model", tmp_path / "b" / "model", bits=4, group_size=GROUP, scope="experts", expert_bits={1: 8})
    shutil.copytree(tmp_path / "b" / "model", tmp_path / "c" / "alone")  # another name: its own config class
    expected = load_model(tmp_path / "c" / "alone")[0]
    plain = load_model(tmp_path / "a" / "model")[0]
    mixed = load_model(tmp_path / "b" / "model")[0]
    again = load_model(tmp_path / "a" / "model")[0]
    with torch.no_grad():
        assert torch.equal(mixed(IDS).logits, expected(IDS).logits)
        assert torch.equal(again(IDS).logits, plain(IDS).logits) and not torch.equal(mixed(IDS).logits, plain(IDS).logits)


def test_loading_a_mixed_checkpoint_logs_no_warning_about_the_experts_groups(tmp_path, caplog):
    """compressed-tensors warns of each expert group's target (per-expert modules the fused family does not have);
    the generated code dequantises those weights itself and drops exactly those warnings, no other."""
    import logging

    model = calm(tiny_model("mixtral"))
    first, second = get_adapter(model).moe_layer_indices(model)[:2]
    quantize(model, tmp_path / "q", bits=4, group_size=GROUP, expert_bits={first: 8, second: {0: 16, 3: 8}})
    groups = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert any("experts" in target for group in groups.values() for target in group["targets"])
    with caplog.at_level(logging.WARNING, logger="compressed_tensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", trust_remote_code=True)
        logging.getLogger("compressed_tensors.utils.match").warning("Could not match `Linear` in instance of MoECompressMixtralForCausalLM")
    assert [r.getMessage() for r in caplog.records if "Could not match" in r.getMessage()] == [
        "Could not match `Linear` in instance of MoECompressMixtralForCausalLM"]
