"""The router and expert variants met across the families, each checked against what the family computes."""

from __future__ import annotations

import warnings

import pytest
import torch

from family_battery import non_uniform_plan
from helpers import token_batches
from moe_compress import KeepLayer, MoECompressError, compress, get_adapter, prune_experts
from moe_compress.arch.adapter import TextOnlyCalibrationWarning
from moe_compress.arch.catalog import build_skeleton, probe_config
from moe_compress.arch.discovery import discover
from moe_compress.arch.family_table import markdown
from moe_compress.arch.table import compute_family_rows
from tiny_models import EXPERTS, SUPPORTED, VOCAB, tiny_config, tiny_model

KEEP = [1, 3, 5, 7]  # two of each group of four, so group-limited routers stay balanced


def _routing(model, adapter, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(router's first output, gates, chosen experts) of every MoE layer on `inputs`."""
    seen, handles = [], []
    for index in adapter.moe_layer_indices(model):
        router = adapter.router(adapter.moe_block(adapter.decoder_layers(model)[index]))
        handles.append(router.register_forward_hook(lambda _m, _a, out: seen.append((out[0], out[1], out[2]))))
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_router_facts_match_what_the_router_computes(model_type):
    """Softmax or sigmoid (or probabilities returned directly), renormalised or not, as each router really gates.

    Gates are the chosen experts' scores p_t (from `router_probs`), times one factor per token:
    the renormalisation (where the router renormalises) and any fixed scaling factor. A router
    that does not renormalise has gates whose sum varies from token to token.
    """
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    for module in model.modules():  # a per-expert gate scale (Gemma 4) is a fourth variant, checked by slicing
        if isinstance(getattr(module, "per_expert_scale", None), torch.nn.Parameter):
            module.per_expert_scale.data.fill_(1.0)
    inputs = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    for first, gates, chosen in _routing(model, adapter, inputs):
        scores = adapter.router_probs(first).reshape(-1, first.shape[-1]).gather(1, chosen.reshape(-1, chosen.shape[-1]).long())
        gates = gates.reshape(scores.shape).double()
        if model_type == "phimoe":  # sparsemixer: a softmax over the logits near the best one, per chosen slot
            continue
        ratio = gates / scores.double()
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4, atol=1e-6)
        sums = gates.sum(dim=-1)
        constant = bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-4))
        assert constant == adapter.renormalizes_top_k(model.config), f"renormalised: {constant}"


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_expert_indexed_tensor_is_sliced_with_its_experts(model_type):
    """Router rows, biases, correction biases (in the router or the block), per-expert scales, fused experts.

    Rows a router keeps beyond the routed experts (Inkling's shared-expert rows) stay after them.
    """
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    before = {}
    for index in adapter.moe_layer_indices(model):
        for tensor in adapter.expert_tensors(adapter.moe_block(layers[index])):
            before[(index, id(tensor.module), tensor.name)] = tensor.value.detach().clone()
    plan = non_uniform_plan(model)
    plan.layers = [KeepLayer(layer=lp.layer, num_experts=lp.num_experts, keep=list(KEEP)) for lp in plan.layers]
    prune_experts(model, plan, adapter)
    for index in adapter.moe_layer_indices(model):
        block = adapter.moe_block(layers[index])
        assert adapter.num_experts(block) == len(KEEP) and adapter.router_size(block) == len(KEEP)
        for tensor in adapter.expert_tensors(block):
            original = before[(index, id(tensor.module), tensor.name)]
            rows = KEEP + list(range(EXPERTS, original.shape[tensor.axis]))
            assert torch.equal(tensor.value, original.index_select(tensor.axis, torch.tensor(rows))), tensor.name


@pytest.mark.parametrize(
    "model_type, expected",
    [
        ("mixtral", dict(router_score="softmax", renormalize=True, shared_expert_attrs=())),
        ("olmoe", dict(router_score="softmax", renormalize="norm_topk_prob")),
        ("jamba", dict(router_score="softmax", renormalize=False)),
        ("deepseek_v3", dict(router_score="sigmoid", group_keys=("n_group", "topk_group"), group_score_experts=2,
                             shared_expert_attrs=("shared_experts",))),
        ("deepseek_v2", dict(router_score="softmax", renormalize=False, group_score_experts=1)),
        ("qwen3_next", dict(shared_expert_attrs=("shared_expert", "shared_expert_gate"))),
        ("minimax_m2", dict(router_score="sigmoid", block_expert_tensors=(("e_score_correction_bias", 0),))),
        ("afmoe", dict(block_expert_tensors=(("expert_bias", 0),), router_expert_tensors=(("gate.weight", 0),))),
        ("gpt_oss", dict(router_expert_tensors=(("weight", 0), ("bias", 0)), moe_returns_tuple=True)),
        ("ernie4_5_moe", dict(gates_use_softmax_bias=True, router_expert_tensors=(("weight", 0), ("moe_statics.e_score_correction_bias", 1)))),
        ("gemma4_text", dict(moe_attr="", router_output="probs", router_expert_tensors=(("per_expert_scale", 0), ("proj.weight", 0)))),
        ("hunyuan_v1_moe", dict(top_k_key="moe_topk", shared_expert_attrs=("shared_mlp",), router_expert_tensors=(("wg.weight", 0),))),
        ("nemotron_h", dict(moe_attr="mixer", pre_moe_norm_attr="norm")),
        ("lfm2_moe", dict(moe_attr="feed_forward", pre_moe_norm_attr="ffn_norm", block_expert_tensors=(("expert_bias", 0),))),
        ("glm_moe_dsa", dict(layer_state=((1, "prev_topk_indices"),))),
        ("qwen3_vl_moe", dict(layers_path="model.language_model.layers", multimodal=True)),
    ],
)
def test_discovered_variants(model_type, expected):
    adapter = get_adapter(tiny_config(model_type))
    assert {key: getattr(adapter, key) for key in expected} == expected


@pytest.mark.parametrize(
    "model_type, rule",
    [
        ("deepseek_v4", "fixed table of expert ids"),  # hash routing
        ("diffusion_gemma", "2 stacks of MoE layers"),  # encoder and decoder
        ("ernie4_5_vl_moe", "2 routed-expert modules per decoder layer"),  # modality-isolated experts
    ],
)
def test_discovery_refuses_layouts_it_cannot_slice(model_type, rule):
    """Beyond the declared refusals, discovery itself refuses these layouts, so a new family like them is refused too."""
    config = tiny_config(model_type) if model_type == "diffusion_gemma" else probe_config(model_type)  # its default is dense
    with pytest.raises(MoECompressError, match=rule):
        discover(build_skeleton(config), model_type, config)


def test_zero_computation_experts_are_refused_with_the_reason():
    with pytest.raises(MoECompressError, match="'longcat_flash' is not supported: zero-computation"):
        get_adapter(probe_config("longcat_flash"))


def test_per_layer_expert_counts_in_a_heterogeneous_config_follow_the_global_count():
    config = tiny_config("gemma4_text", per_layer_config={"1": {"num_experts": 6}})
    adapter = get_adapter(tiny_config("gemma4_text"))
    assert adapter.config_num_experts(config) == EXPERTS
    adapter.set_config_num_experts(config, 4)
    assert adapter.config_num_experts(config) == 4 and not (config.to_dict().get("per_layer_config") or {})


def test_text_only_calibration_of_a_multimodal_model_says_so():
    with pytest.warns(TextOnlyCalibrationWarning, match="multimodal model and calibration here is text only"):
        compress(tiny_model("qwen3_vl_moe"), method="frequency", ratio=0.25, calib=token_batches(1), cache_dir=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TextOnlyCalibrationWarning)
        compress(tiny_model("qwen3_moe"), method="frequency", ratio=0.25, calib=token_batches(1), cache_dir=False)


def test_families_table_covers_every_type_and_the_readme_holds_it():
    """The README's table is `moe-compress families --markdown`, regenerated whenever a family changes."""
    from pathlib import Path

    rows = compute_family_rows()  # built now, not read back
    supported = {row.model_type for row in rows if row.supported}
    assert supported == set(SUPPORTED)
    assert all(row.router and row.outputs for row in rows if row.supported), "a default config that does not build"
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert markdown(rows) in readme, "README families table is stale: paste `moe-compress families --markdown`"


@pytest.mark.parametrize(
    "model_type, block, reason",
    [
        ("beam", 1, "depth-dependent setting of layer 2 .attn_residual_add_idx"),  # residuals scaled by depth
        ("qwen3_next", 3, "removes every 'full_attention' layer"),  # a hybrid needs its attention layers
    ],
)
def test_block_drop_refuses_what_a_stock_config_cannot_keep_and_leaves_the_model_as_it_was(model_type, block, reason):
    from moe_compress import Plan, apply_plan

    model = tiny_model(model_type, num_layers=4)
    adapter = get_adapter(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    plan = Plan(model_type=model_type, top_k=2, layers=[], num_layers=4, dropped_blocks=[block])
    with pytest.raises(MoECompressError, match=reason):
        apply_plan(model, plan, adapter)
    assert len(adapter.decoder_layers(model)) == 4 and model.config.get_text_config().num_hidden_layers == 4
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_groups_scored_by_their_two_best_experts_keep_two_each_whatever_the_score():
    """Mistral 4 scores groups like DeepSeek-V3 (sum of the best two) but with softmax scores."""
    from moe_compress.methods.expert_pruning import routing_limits

    for model_type in ("deepseek_v3", "mistral4"):
        config = tiny_config(model_type)
        assert routing_limits(get_adapter(config), config).min_per_group == 2
    config = tiny_config("deepseek_v2", n_group=2, topk_group=1, topk_method="group_limited_greedy")
    assert routing_limits(get_adapter(config), config).min_per_group == 1  # DeepSeek-V2 takes a group's best expert
