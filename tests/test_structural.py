"""Layer drop, block drop and CD-MoE condensing: scores, identities, loading, fine-tuning."""

from __future__ import annotations

import copy
import inspect
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_reloads_exactly, load_in_fresh_process, save_expected, token_batches
from moe_compress import CalibrationSpec, CondenseLayer, MoECompressError, Plan, apply_plan, condense, drop, finetune, get_adapter, load_model
from moe_compress.engine.statistics import collect_statistics
from moe_compress.methods.condense_eval import (
    CachedLayers, LayerProbe, condensed, hidden_log_probs, js_divergence, mean_selected_gate,
)
from moe_compress.methods.condense import CondenseSearch
from moe_compress.methods.structural import plan_drop
from moe_compress.walk.similarity import Similarities, _cos_sum, observe_similarities
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import VOCAB, tiny_model


def test_cosine_on_a_hand_case():
    total, count = _cos_sum(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, -3.0]]))
    assert count == 2 and math.isclose(total, 1 / math.sqrt(2) - 1.0, rel_tol=1e-12)


def test_js_divergence_hand_case():
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[1.0, 1e-30]]))
    # m = [.75, .25]; JSD = .5 KL(p||m) + .5 KL(q||m) = .5(.5 ln(2/3) + .5 ln 2) + .5 ln(4/3)
    expected = 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) + 0.5 * math.log(1 / 0.75)
    assert math.isclose(float(js_divergence(p, q)), expected, rel_tol=1e-6)
    assert float(js_divergence(p, p)) == 0.0


def test_hidden_state_jsd_hand_case():
    # The CD-MoE reference's distribution over a hidden state: softmax over the hidden dimension.
    a = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [.25, .75]
    b = torch.tensor([[5.0, 5.0]])  # softmax -> [.5, .5] (shift-invariant)
    assert hidden_log_probs(a).exp()[0].tolist() == pytest.approx([0.25, 0.75])
    # m = [.375, .625]: JSD = .5 (.25 ln(.25/.375) + .75 ln(.75/.625)) + .5 (.5 ln(.5/.375) + .5 ln(.5/.625))
    expected = 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)) + 0.5 * (
        0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)
    )
    assert float(js_divergence(hidden_log_probs(a), hidden_log_probs(b))) == pytest.approx(expected, rel=1e-6)


def test_consecutive_block_drop_scores_the_span_or_the_framework_gap():
    # 5 blocks, boundaries h_0..h_5. cos(h_i, h_i+2) is highest at i = 3, cos(h_i, h_i+3) at i = 0.
    scores = Similarities(blocks={2: [0.1, 0.2, 0.3, 0.9], 3: [0.8, 0.1, 0.2]})
    model = tiny_model("mixtral", num_layers=5)
    adapter = get_adapter(model)
    span = plan_drop(model, adapter, scores, "block", n=2, mode="consecutive")
    framework = plan_drop(model, adapter, scores, "block", n=2, mode="consecutive", consecutive_score="framework")
    assert span.dropped_blocks == [3, 4], "cos(h_3, h_5): the two dropped blocks' input against their output"
    assert framework.dropped_blocks == [0, 1], "the framework's cos(h_i, h_i+n+1) for a run of n"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "granitemoe"])
def test_scores_equal_cosines_computed_from_the_full_model(family):
    model = tiny_model(family, num_layers=4)
    adapter = get_adapter(model)
    batches = token_batches(count=2)
    scores = observe_similarities(model, adapter, batches, max_distance=2)
    # Reference from a plain forward: boundaries via layer hooks, MoE residual as output - mlp output.
    boundaries, moe_parts = {}, {}
    handles = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        handles.append(layer.register_forward_hook(lambda m, a, o, i=index: boundaries.setdefault(i + 1, []).append(o)))
        handles.append(layer.register_forward_pre_hook(lambda m, a, i=index: boundaries.setdefault(i, []).append(a[0]) if i == 0 else None))
        handles.append(getattr(layer, adapter.moe_attr).register_forward_hook(lambda m, a, o, i=index: moe_parts.setdefault(i, []).append(o)))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()

    def mean_cos(a_list, b_list):
        a, b = torch.cat([a.reshape(-1, a.shape[-1]) for a in a_list]), torch.cat([b.reshape(-1, b.shape[-1]) for b in b_list])
        return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())

    for distance in (1, 2):
        for i, value in enumerate(scores.blocks[distance]):
            assert math.isclose(value, mean_cos(boundaries[i], boundaries[i + distance]), rel_tol=1e-9, abs_tol=1e-12)
    for layer in adapter.moe_layer_indices(model):
        outs, parts = boundaries[layer + 1], moe_parts[layer]
        if family == "granitemoe":  # h + m * residual_multiplier
            parts = [p * model.config.residual_multiplier for p in parts]
        residual = [o - p for o, p in zip(outs, parts)]
        assert math.isclose(scores.moe[layer], mean_cos(residual, outs), rel_tol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_dropping_nothing_is_an_identity(family):
    model = tiny_model(family)
    inputs = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(inputs).logits
    apply_plan(model, Plan(model_type=family, top_k=2, layers=[], num_layers=3))
    with torch.no_grad():
        assert torch.equal(model(inputs).logits, before)


@pytest.fixture(scope="module")
def structural_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("structural")
    inputs = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    jobs = []
    cases = {
        "mixtral-block": ("mixtral", dict(unit="block", n=1)),
        "qwen3_moe-block": ("qwen3_moe", dict(unit="block", n=1)),  # mlp_only_layers renumbered
        "deepseek_v3-block": ("deepseek_v3", dict(unit="block", n=2, mode="consecutive")),  # first_k_dense_replace
        "gpt_oss-block": ("gpt_oss", dict(unit="block", n=1)),  # layer_types subset
        "ernie4_5_moe-block": ("ernie4_5_moe", dict(unit="block", n=1)),  # MoE range recomputed
        "qwen2_moe-moe": ("qwen2_moe", dict(unit="moe", n=1)),
        "gpt_oss-moe": ("gpt_oss", dict(unit="moe", n=2)),
    }
    for name, (family, options) in cases.items():
        model = tiny_model(family, num_layers=4)
        drop(model, calib=token_batches(count=2), out=root / name, **options)
        save_expected(root / name, inputs, model)
        jobs.append({"path": str(root / name), "remote": options["unit"] == "moe"})
    for family in ("deepseek_v3", "qwen2_moe", "mixtral"):
        model = tiny_model(family, num_layers=4)
        condense(model, layers=1, calib=token_batches(count=1, batch=1, seq_len=8), out=root / f"{family}-condensed", cache_dir=False)
        save_expected(root / f"{family}-condensed", inputs, model)
        jobs.append({"path": str(root / f"{family}-condensed"), "remote": True})
    for family in ("deepseek_v3", "qwen2_moe"):  # CD-MoE-S: shared experts only
        model = tiny_model(family, num_layers=4)
        condense(model, layers=2, experts=0, calib=token_batches(count=1, batch=1, seq_len=8), out=root / f"{family}-shared-only",
                 cache_dir=False)
        save_expected(root / f"{family}-shared-only", inputs, model)
        jobs.append({"path": str(root / f"{family}-shared-only"), "remote": True})
    return root, load_in_fresh_process(jobs)


@pytest.mark.parametrize("name", ["mixtral-block", "qwen3_moe-block", "deepseek_v3-block", "gpt_oss-block", "ernie4_5_moe-block"])
def test_block_dropped_checkpoint_loads_in_plain_transformers(structural_checkpoints, name):
    root, results = structural_checkpoints
    result = results[str(root / name)]
    assert result["class"] != "MoECompressForCausalLM"
    assert_reloads_exactly(result)


@pytest.mark.parametrize(
    "name",
    ["qwen2_moe-moe", "gpt_oss-moe", "deepseek_v3-condensed", "qwen2_moe-condensed", "mixtral-condensed",
     "deepseek_v3-shared-only", "qwen2_moe-shared-only"],
)
def test_dropped_and_condensed_layers_reload_exactly(structural_checkpoints, name):
    root, results = structural_checkpoints
    result = results[str(root / name)]
    assert result["class"].startswith("MoECompress")
    assert_reloads_exactly(result)


@pytest.mark.parametrize("name", ["qwen2_moe-moe", "gpt_oss-moe", "mixtral-condensed"])
def test_dropped_moe_sub_layers_are_skips_in_the_standard_per_layer_config(structural_checkpoints, name):
    """A dropped MoE sub-layer is `skip: ["mlp"]` in transformers' schema; a condensed layer has no standard form."""
    import json

    config = json.loads((structural_checkpoints[0] / name / "config.json").read_text())
    layers = config["moe_compress"]["layers"]
    stated = {int(i): v for i, v in config.get("per_layer_config", {}).items()}
    assert stated == {int(i): {"skip": ["mlp"]} for i, spec in layers.items() if spec.get("dropped")}
    assert any(spec.get("dropped") for spec in layers.values()) == name.endswith("-moe")


def test_block_drop_renumbers_the_config():
    model = tiny_model("qwen3_moe", num_layers=4)  # mlp_only_layers=[1]
    apply_plan(model, Plan(model_type="qwen3_moe", top_k=2, layers=[], dropped_blocks=[0], num_layers=4))
    assert model.config.num_hidden_layers == 3 and model.config.mlp_only_layers == [0]
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1, 2]
    model = tiny_model("deepseek_v3", num_layers=4)  # first_k_dense_replace=1
    apply_plan(model, Plan(model_type="deepseek_v3", top_k=2, layers=[], dropped_blocks=[2], num_layers=4))
    assert model.config.first_k_dense_replace == 1 and model.config.num_hidden_layers == 3


def _constant_routing_model():
    """DeepSeek-V3 whose router ignores the input: zero weights, a correction bias that picks
    experts 0 and 1, so every token gets the same two experts with the same gates."""
    model = tiny_model("deepseek_v3", num_layers=3, n_group=1, topk_group=1)
    adapter = get_adapter(model)
    with torch.no_grad():
        for index in adapter.moe_layer_indices(model):
            router = adapter.router(adapter.moe_block(model.model.layers[index]))
            router.weight.zero_()
            router.e_score_correction_bias.copy_(torch.tensor([1.0, 0.5, 0, 0, 0, 0, 0, 0]))
    return model, adapter


def test_condensed_layer_equals_the_original_when_routing_is_constant():
    model, adapter = _constant_routing_model()
    inputs = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        before = model(inputs).logits
    stats, _ = collect_statistics(model, token_batches(), ("gate_sum", "selected"), cache_dir=False)
    weights = mean_selected_gate(stats[1])
    assert torch.allclose(weights[:2], torch.tensor([1.25, 1.25], dtype=torch.float64)), "sigmoid(0)=.5, renormalised, x2.5"
    plan = Plan(model_type="deepseek_v3", top_k=2, layers=[CondenseLayer(layer=1, num_experts=8, keep=[0, 1], condensed_weights=[float(weights[0]), float(weights[1])])], num_layers=3)
    apply_plan(model, plan, adapter)
    block = adapter.moe_block(model.model.layers[1])
    assert adapter.num_experts(block) == 2 and type(adapter.router(block)).__name__ == "ConstantRouter"
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=1e-5)


def test_condense_search_finds_the_constant_routing():
    model, _ = _constant_routing_model()
    result = condense(model, layers=1, calib=token_batches(count=1), cache_dir=False)
    layer = result.plan.layers[0]
    assert layer.keep == [0, 1] and result.plan.meta["order_jsd"][0] < 1e-9
    assert result.plan.meta["evaluations"] > 0


def test_finetuning_reduces_calibration_loss(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    model, tokenizer = load_model(checkpoint)
    condense(model, layers=1, calib=CalibrationSpec(str(calib), samples=16, seq_len=64), tokenizer=tokenizer, cache_dir=False)
    report = finetune(model, tokenizer, data=str(calib), steps=25, lr=1e-2, batch_size=4, seq_len=32, eval_data=str(calib),
                      eval_windows=8, out=tmp_path / "tuned", checkpoint_every=10)
    assert report["last_loss"] < report["first_loss"]
    assert report["perplexity_after"] < report["perplexity_before"]
    assert (tmp_path / "tuned.checkpoints" / "step-10" / "config.json").is_file()
    reloaded, _ = load_model(tmp_path / "tuned")
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_shared_only_condensing_leaves_no_routed_expert(tmp_path):
    """CD-MoE-S (K = 0): the condensed layers keep their shared experts and nothing else."""
    model = tiny_model("deepseek_v3", num_layers=4)
    adapter = get_adapter(model)
    result = condense(model, layers=2, experts=0, calib=token_batches(count=1), cache_dir=False, out=tmp_path / "s")
    chosen = result.plan.meta["order"]
    assert all(layer.keep == [] and layer.condensed_weights == [] for layer in result.plan.layers)
    assert all(order == [] for order in result.plan.meta["expert_orders"].values())
    inputs = torch.randint(3, VOCAB, (1, 7))
    for layer in chosen:
        block = adapter.moe_block(model.model.layers[layer])
        assert adapter.num_experts(block) == 0
        x = torch.randn(1, 5, model.config.hidden_size)
        with torch.no_grad():
            torch.testing.assert_close(block(x), block.shared_experts(x), rtol=0, atol=0)
    layers = json.loads((tmp_path / "s" / "config.json").read_text())["moe_compress"]["layers"]
    assert all(layers[str(layer)] == {"router": 0, "experts": 0, "condensed": True} for layer in chosen)
    with torch.no_grad():
        assert torch.isfinite(model(inputs).logits).all()


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "granitemoe", "gpt_oss"])
def test_layer_probe_reproduces_the_condensed_layer_bit_for_bit(family):
    """Replaying a layer around a candidate MoE output equals running the condensed layer itself."""
    model = tiny_model(family, num_layers=3)
    adapter = get_adapter(model)
    batches = token_batches(count=2)
    stats, _ = collect_statistics(model, batches, ("gate_sum", "selected"), cache_dir=False)
    layer = adapter.moe_layer_indices(model)[-1]
    weights = mean_selected_gate(stats[layer])
    cache = CachedLayers(model, adapter, batches)
    probe = LayerProbe(cache, layer)
    block = adapter.moe_block(model.model.layers[layer])
    for experts in ([], [3], [5, 1, 6]):
        outputs = []
        for b in range(len(batches)):
            summed = torch.zeros_like(probe.moe_inputs[b].reshape(-1, model.config.hidden_size))
            for e in experts:
                summed = summed + probe.expert_output(b, e, weights[e])
            outputs.append(probe.layer_outputs(b, [probe.moe_output(b, summed)] * 2))
        with condensed(adapter, block, experts, weights):
            direct = cache.run(layer, cache.inputs(layer), layer + 1)
        for b, stacked in enumerate(outputs):
            assert torch.equal(stacked[: batches[b].shape[0]], direct[b]) and torch.equal(stacked[batches[b].shape[0]:], direct[b])


def test_next_token_search_divergences_equal_a_full_forward():
    """The search's recorded divergence for each prefix equals the JSD of full-model logits."""
    model = tiny_model("qwen2_moe", num_layers=3)
    fresh = copy.deepcopy(model)
    adapter = get_adapter(fresh)
    batches = token_batches(count=2)
    search = condense(model, layers=1, objective="next_token", calib=batches, cache_dir=False).plan
    stats, _ = collect_statistics(fresh, batches, ("gate_sum", "selected"), cache_dir=False)
    with torch.no_grad():
        reference = [F.log_softmax(fresh(b).logits.float(), dim=-1) for b in batches]
    for layer, order in search.meta["expert_orders"].items():
        curve, block = search.meta["per_layer_jsd_by_size"][layer], adapter.moe_block(fresh.model.layers[int(layer)])
        for size in range(1, len(order) + 1):
            with torch.no_grad(), condensed(adapter, block, order[:size], mean_selected_gate(stats[int(layer)])):
                modified = [F.log_softmax(fresh(b).logits.float(), dim=-1) for b in batches]
            expected = sum(float(js_divergence(r, m)) for r, m in zip(reference, modified)) / len(batches)
            assert curve[size - 1] == pytest.approx(expected, rel=1e-5, abs=1e-10)


def test_search_resumes_from_its_saved_state(tmp_path):
    model = tiny_model("deepseek_v3", num_layers=4)
    batches = token_batches(count=1)
    state = tmp_path / "search.json"
    first_run = condense(copy.deepcopy(model), layers=2, calib=batches, cache_dir=False, state_file=state).plan
    assert state.is_file() and first_run.meta["evaluations"] > 0 and not first_run.meta["resumed"]
    # An interrupted search: keep only the first layer's expert order and no layer order.
    saved = json.loads(state.read_text())
    kept_layer = next(iter(saved["expert_orders"]))
    saved["expert_orders"] = {kept_layer: saved["expert_orders"][kept_layer]}
    saved["expert_divergences"] = {kept_layer: saved["expert_divergences"][kept_layer]}
    saved["layer_order"], saved["layer_divergences"] = [], []
    state.write_text(json.dumps(saved))
    resumed = condense(copy.deepcopy(model), layers=2, calib=batches, cache_dir=False, state_file=state).plan
    assert resumed.meta["resumed"] and 0 < resumed.meta["evaluations"] < first_run.meta["evaluations"]
    assert resumed.meta["order"] == first_run.meta["order"] and resumed.meta["expert_orders"] == first_run.meta["expert_orders"]
    assert [lp.keep for lp in resumed.layers] == [lp.keep for lp in first_run.layers]
    again = condense(copy.deepcopy(model), layers=2, calib=batches, cache_dir=False, state_file=state).plan
    assert again.meta["evaluations"] == 0
    with pytest.raises(MoECompressError, match="belongs to another"):
        condense(copy.deepcopy(model), layers=2, experts=1, calib=batches, cache_dir=False, state_file=state)


def test_condense_refuses_bad_settings():
    model = tiny_model("deepseek_v3", num_layers=4)
    for options, message in ((dict(experts=9), "0..8"), (dict(objective="logits"), "objective"), (dict(experts=0, choose_size=True), "at least one")):
        with pytest.raises(MoECompressError, match=message):
            condense(copy.deepcopy(model), layers=1, calib=token_batches(count=1), cache_dir=False, **options)


def test_shared_only_condensing_refuses_a_model_without_shared_experts():
    """K = 0 on Mixtral (no shared experts) would empty the condensed layers' MoE: a layer drop under another name."""
    model = tiny_model("mixtral", num_layers=4)
    with pytest.raises(MoECompressError, match=r"MoE layer 0 has none.*use `moe-compress drop --unit moe`"):
        condense(model, layers=1, experts=0, calib=token_batches(count=1), cache_dir=False)


def test_finetune_defaults_are_the_cd_moe_authors():
    from moe_compress.finetuning import SCHEDULES

    defaults = {name: p.default for name, p in inspect.signature(finetune).parameters.items()}
    assert (defaults["lr"], defaults["weight_decay"], defaults["batch_size"], defaults["seq_len"], defaults["schedule"]) == (
        1e-5, 0.01, 8, 256, "linear"
    )
    assert [SCHEDULES["linear"](f) for f in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]


class _Silent:
    def advance(self, *_args) -> None:
        pass


def test_early_stop_rules_out_only_candidates_that_cannot_win():
    """The expert step's bound: returned divergences are exact, the ones skipped could not have won."""
    model = tiny_model("deepseek_v3", num_layers=3, n_group=1, topk_group=1)
    adapter = get_adapter(model)
    with torch.no_grad():  # expert 5 of layer 1 becomes a terrible choice: its bound rules it out after one batch
        adapter.experts(adapter.moe_block(model.model.layers[1])).down_proj[5] *= 50
    batches = token_batches(count=4)
    stats, _ = collect_statistics(model, batches, ("gate_sum", "selected"), cache_dir=False)
    search = CondenseSearch(model, adapter, batches, stats, "layer_output", 1)
    probe = LayerProbe(search.cache, 1)
    for order in ([], [3]):
        candidates = [e for e in range(8) if e not in order]
        fast = search.expert_candidates(probe, order, candidates, _Silent(), "")
        tokens = sum(search._tokens(h) for h in probe.reference)
        full = [sum(search._batch_sums(probe, b, order, [c])[0] for b in range(len(batches))) / tokens for c in candidates]
        assert min(zip(fast, candidates)) == min(zip(full, candidates))
        for quick, exact in zip(fast, full):
            assert quick == float("inf") and exact > min(full) or quick == pytest.approx(exact, rel=1e-12)
        assert fast[candidates.index(5)] == float("inf"), "the terrible candidate is ruled out early"


def test_condense_refuses_before_loading_what_memory_cannot_hold(tmp_path, monkeypatch):
    """CD-MoE does not stream: a model plus cached layer inputs larger than the free memory is refused up front."""
    from typer.testing import CliRunner

    import moe_compress.source.open as io_open
    from moe_compress.cli import app

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    monkeypatch.setattr(io_open, "available_bytes", lambda device: 1000)
    result = CliRunner().invoke(app, ["condense", str(checkpoint), "--layers", "1", "--samples", "4", "--seq-len", "16", "--out", str(tmp_path / "cd")])
    assert result.exit_code == 2 and "holds the whole model in memory" in result.output and "cached layer inputs" in result.output
    assert not (tmp_path / "cd").exists()
