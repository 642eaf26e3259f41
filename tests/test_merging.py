"""Expert merging (HC-SMoE, M-SMoE, REAM): exact surgery, neuron alignment, plans, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_reloads_exactly, load_in_fresh_process, save_expected, token_batches
from moe_compress import KeepLayer, LayerPlan, MergeLayer, MoECompressError, Plan, apply_plan, compress, get_adapter
from moe_compress.methods import METHODS, PlanRequest
from moe_compress.methods.expert_pruning import routing_limits
from moe_compress.methods.merging import cluster_outputs, logit_cosine
from moe_compress.methods.merging_align import align_groups
from moe_compress.methods.merging_ream import pseudo_groups
from moe_compress.surgery.merge import NeuronAligner
from tiny_models import FAMILIES, VOCAB, tiny_model

IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
MERGING = ("hc-smoe", "m-smoe", "ream")


def _blocks(model):
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    return adapter, [(i, adapter.moe_block(layers[i])) for i in adapter.moe_layer_indices(model)]


def _plan(model, layers: dict[int, LayerPlan]) -> Plan:
    adapter = get_adapter(model)
    limits = routing_limits(adapter, model.config)
    return Plan(model_type=adapter.model_type, top_k=limits.top_k, layers=list(layers.values()), routing_groups=limits.groups,
                groups_per_token=limits.groups_per_token, min_per_group=limits.min_per_group)


@torch.no_grad()
def _copy_expert(block, adapter, source: int, target: int) -> None:
    for tensor in adapter.routed_expert_tensors(block):
        tensor.value[target] = tensor.value[source]


# Two merged pairs, one in each half of the experts, so group-limited routers (two routing
# groups of four in the tiny DeepSeek-V3) keep equal group sizes.
PAIRS = ((0, 1), (4, 5))
WEIGHTS = (0.25, 0.75)  # exact in binary: the expected router rows are computed independently below


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_merging_identical_experts_equals_keeping_one_with_combined_router_rows(family):
    original = tiny_model(family)
    adapter, blocks = _blocks(original)
    for _, block in blocks:
        for keep, twin in PAIRS:
            _copy_expert(block, adapter, keep, twin)
    kept = [e for e in range(8) if e not in {twin for _, twin in PAIRS}]
    merges = [[e, e + 1] if (e, e + 1) in PAIRS else [e] for e in kept]
    weights = [list(WEIGHTS) if len(g) == 2 else [1.0] for g in merges]
    merged = apply_plan(_copy(original), _plan(original, {i: MergeLayer(layer=i, num_experts=8, keep=kept, merges=merges, merge_weights=weights) for i, _ in blocks}))

    # The reference: prune the twins, then combine the router rows by hand.
    pruned = _copy(original)
    combined = {}
    for index, block in blocks:
        for tensor in adapter.router_tensors(block):
            rows = [WEIGHTS[0] * tensor.value.select(tensor.axis, keep).double() + WEIGHTS[1] * tensor.value.select(tensor.axis, twin).double()
                    for keep, twin in PAIRS]
            combined[(index, tensor.name)] = [row.to(tensor.value.dtype) for row in rows]
    apply_plan(pruned, _plan(original, {i: KeepLayer(layer=i, num_experts=8, keep=kept) for i, _ in blocks}))
    pruned_adapter, pruned_blocks = _blocks(pruned)
    for index, block in pruned_blocks:
        for tensor in pruned_adapter.router_tensors(block):
            for (keep, _), row in zip(PAIRS, combined[(index, tensor.name)]):
                tensor.value.select(tensor.axis, kept.index(keep)).copy_(row)
    assert torch.equal(merged(IDS).logits, pruned(IDS).logits)
    assert merged.config.to_dict() == pruned.config.to_dict()


def _copy(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("alignment", ["weights", "activations", "activations+weights"])
@torch.no_grad()
def test_neuron_alignment_recovers_a_permuted_copy_exactly(family, alignment):
    model = tiny_model(family)
    adapter, blocks = _blocks(model)
    index, block = blocks[0]
    experts = adapter.experts(block)
    aligner = NeuronAligner(experts)
    intermediate = experts.down_proj.shape[1 if aligner.transposed else 2]
    perm = torch.randperm(intermediate, generator=torch.Generator().manual_seed(7))
    inverse = torch.argsort(perm)
    for tensor in adapter.routed_expert_tensors(block):  # expert 3 = expert 0 with its neurons shuffled
        tensor.value[3] = aligner.permute(tensor.name, tensor.value[0], inverse)
    assert not torch.equal(experts.down_proj[3], experts.down_proj[0])
    inputs = torch.randn(48, model.config.hidden_size, generator=torch.Generator().manual_seed(8))
    found = align_groups(experts, [[0, 3]], alignment, inputs)
    assert torch.equal(found, perm[None])

    kept = [e for e in range(8) if e != 3]
    layer_plan = MergeLayer(layer=index, num_experts=8, keep=kept, merges=[[0, 3] if e == 0 else [e] for e in kept],
                           merge_weights=[[0.5, 0.5] if e == 0 else [1.0] for e in kept])
    plan = _plan(model, {index: layer_plan})
    plan.merge_permutations = {index: found}
    before = {t.name: t.value[0].clone() for t in adapter.routed_expert_tensors(block)}
    unaligned = _plan(model, {index: layer_plan})
    naive = apply_plan(_copy(model), unaligned)
    apply_plan(model, plan)
    for tensor in adapter.routed_expert_tensors(adapter.moe_block(adapter.decoder_layers(model)[index])):
        assert torch.equal(tensor.value[0], before[tensor.name]), tensor.name  # the aligned average is expert 0 itself
    naive_block = adapter.moe_block(adapter.decoder_layers(naive)[index])
    assert not torch.equal(adapter.experts(naive_block).down_proj[0], before["down_proj"])


def test_permutations_for_other_experts_are_refused():
    model = tiny_model("mixtral")
    kept = [0, 2, 3, 4, 5, 6, 7]
    plan = _plan(model, {0: MergeLayer(layer=0, num_experts=8, keep=kept, merges=[[0, 1]] + [[e] for e in kept[1:]], merge_weights=[[1.0, 1.0]] + [[1.0]] * 6)})
    plan.merge_permutations = {0: torch.arange(5)[None]}  # the tiny experts have 16 neurons
    with pytest.raises(MoECompressError, match="permutations have 5 neurons; its experts have 16"):
        apply_plan(model, plan)


@pytest.fixture(scope="module")
def merged_checkpoints(tmp_path_factory):
    """Each merging method, uniform (stock) and global (remote code), saved and reloaded in one fresh process."""
    root = tmp_path_factory.mktemp("merged")
    jobs = []
    for family in ("mixtral", "deepseek_v3", "gpt_oss"):
        for method in MERGING:
            for budget in ("layer", "global"):
                model = tiny_model(family)
                path = root / f"{family}-{method}-{budget}"
                compress(model, method=method, ratio=0.25, budget=budget, calib=token_batches(), out=path, cache_dir=False)
                save_expected(path, IDS, model)
                jobs.append({"path": str(path), "remote": budget == "global"})
    return root, load_in_fresh_process(jobs)


@pytest.mark.parametrize("method", MERGING)
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_merged_uniform_checkpoint_is_stock_and_reloads_exactly(merged_checkpoints, family, method):
    root, results = merged_checkpoints
    path = root / f"{family}-{method}-layer"
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == family and "auto_map" not in config and "moe_compress" not in config
    assert config[get_adapter(tiny_model(family)).num_experts_key] == 6
    plan = Plan.load(path / "moe_compress_plan.json")
    assert plan.method == method and any(len(group) > 1 for lp in plan.layers for group in lp.merges)
    assert_reloads_exactly(results[str(path)])


@pytest.mark.parametrize("method", MERGING)
def test_non_uniform_merge_reloads_through_remote_code(merged_checkpoints, method):
    root, results = merged_checkpoints
    for family in ("mixtral", "deepseek_v3", "gpt_oss"):
        path = root / f"{family}-{method}-global"
        result = results[str(path)]
        assert_reloads_exactly(result)
        if "moe_compress" in json.loads((path / "config.json").read_text()):
            assert result["class"].startswith("MoECompress")


def test_merges_stay_inside_routing_groups_and_combine_correction_biases():
    model = tiny_model("deepseek_v3")
    original = _copy(model)
    result = compress(model, method="hc-smoe", ratio=0.5, calib=token_batches(), cache_dir=False, options={"protect_super_experts": False})
    adapter, blocks = _blocks(original)
    for lp in result.plan.layers:
        assert [sum(1 for e in lp.keep if e < 4), sum(1 for e in lp.keep if e >= 4)] == [2, 2]
        assert all(e // 4 == group[0] // 4 for group in lp.merges for e in group)
        gate = adapter.router(dict(blocks)[lp.layer])
        bias = gate.e_score_correction_bias.double()
        merged_bias = adapter.router(adapter.moe_block(adapter.decoder_layers(model)[lp.layer])).e_score_correction_bias
        for slot, (group, weights) in enumerate(zip(lp.merges, lp.merge_weights)):
            w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
            assert float(merged_bias[slot]) == pytest.approx(float((w * bias[group]).sum()), abs=1e-7)


def test_plan_with_merges_round_trips_and_validates(tmp_path):
    layer = MergeLayer(layer=0, num_experts=8, keep=[0, 2, 3, 4, 6, 7], merges=[[0, 1], [2], [3], [4, 5], [6], [7]],
                      merge_weights=[[1.0, 3.0], [1.0], [1.0], [0.5, 0.5], [1.0], [1.0]], merge_router="centroid")
    plan = Plan(model_type="mixtral", top_k=2, layers=[layer], method="ream", merge_permutations={0: torch.tensor([[1, 0, 2], [0, 2, 1]])})
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.layers == plan.layers and torch.equal(loaded.merge_permutations[0], plan.merge_permutations[0])
    old = json.loads((tmp_path / "plan.json").read_text())
    old["format"] = "moe-compress/plan@1"
    for lp in old["layers"]:  # as format 1 wrote a pruned layer before merging existed
        for key in ("action", "merges", "merge_weights", "merge_router"):
            del lp[key]
    assert Plan.from_dict(old).layers[0].action == "keep"  # plans written before merging still load

    def broken(**changes):
        fields = {"layer": 0, "num_experts": 8, "keep": layer.keep, "merges": layer.merges, "merge_weights": layer.merge_weights, **changes}
        return Plan(model_type="mixtral", top_k=2, layers=[MergeLayer(**fields)])

    cases = [
        (dict(merges=[[1, 0], [2], [3], [4, 5], [6], [7]]), "each starting with that expert"),
        (dict(merges=[[0, 1], [2, 1], [3], [4, 5], [6], [7]], merge_weights=[[1, 1], [1, 1], [1], [1, 1], [1], [1]]), "distinct"),
        (dict(merge_weights=[[0.0, 0.0], [1.0], [1.0], [0.5, 0.5], [1.0], [1.0]]), "not all zero"),
        (dict(merge_weights=[[1.0], [1.0], [1.0], [0.5, 0.5], [1.0], [1.0]]), "one weight per merged expert"),
        (dict(merge_router="average"), "merge_router"),
    ]
    for changes, message in cases:
        with pytest.raises(MoECompressError, match=message):
            broken(**changes).validate()
    grouped = Plan(model_type="deepseek_v3", top_k=2, layers=[MergeLayer(layer=1, num_experts=8, keep=[0, 2, 4, 6], merges=[[0, 1], [2, 5], [4], [6]], merge_weights=[[1, 1], [1, 1], [1], [1]])],
                   routing_groups=2, min_per_group=2)
    with pytest.raises(MoECompressError, match="within their routing group"):
        grouped.validate()
    plan.merge_permutations = {0: torch.tensor([[1, 1, 2], [0, 2, 1]])}
    with pytest.raises(MoECompressError, match="permutation"):
        plan.validate()


def test_hierarchical_clustering_groups_similar_signatures():
    signatures = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [5.0, 5.2], [-4.0, 3.0]])
    groups = cluster_outputs(signatures, 3)
    assert sorted(sorted(g) for g in groups) == [[0, 1], [2, 3, 4], [5]]
    big = next(g for g in groups if len(g) == 3)
    assert big[0] == 2  # nearest the cluster mean (5.033, 5.067) leads


def _request(model, stats, ratio=0.25, **kw) -> PlanRequest:
    return PlanRequest(get_adapter(model), model.config, stats, ratio, model=model, **kw)


def test_m_smoe_joins_each_expert_to_the_dominant_expert_with_the_most_similar_logits():
    model = tiny_model("mixtral", num_layers=1)
    logits = torch.randn(200, 8, generator=torch.Generator().manual_seed(2)).double()
    logits[:, 6] = 2 * logits[:, 1] + 0.01 * logits[:, 6]  # expert 6's logits follow expert 1's
    logits[:, 7] = logits[:, 3]
    stats = {0: {"tokens": torch.full((8,), 200.0), "selected": torch.tensor([90.0, 80, 70, 60, 50, 40, 5, 3]),
                 "logit_gram": logits.T @ logits, "max_output_abs": torch.ones(8)}}
    plan = METHODS["m-smoe"].make_plan(_request(model, stats), {"protect_super_experts": False})
    assert plan.layers[0].keep == [0, 1, 2, 3, 4, 5]
    assert plan.layers[0].merges == [[0], [1, 6], [2], [3, 7], [4], [5]]
    assert plan.layers[0].merge_weights[1] == [80 / 200, 5 / 200]
    assert torch.allclose(logit_cosine(stats[0]["logit_gram"])[3, 7], torch.tensor(1.0, dtype=torch.float64))


def test_ream_pseudo_grouping_fills_the_most_salient_centroid_first():
    model = tiny_model("mixtral", num_layers=1)
    request = _request(model, {})
    saliency = torch.tensor([5.0, 1, 4, 1, 3, 1, 1, 1])
    distance = torch.full((8, 8), 0.9)
    distance[4, 1] = distance[4, 3] = 0.1  # closest to centroid 4, but centroid 0 chooses first
    distance[0, 1] = distance[0, 3] = 0.5
    distance[0, 5] = 0.6
    distance[2, 6] = distance[2, 7] = 0.2
    groups = pseudo_groups(request, saliency, [0, 2, 4], distance, group_size=3, protected=set())
    assert groups == [[0, 1, 3], [2, 6, 7], [4, 5]]
    nearest = pseudo_groups(request, saliency, [0, 2, 4], distance, group_size=0, protected=set())
    assert nearest == [[0, 5], [2, 6, 7], [4, 1, 3]]
    guarded = pseudo_groups(request, saliency, [0, 2, 4], distance, group_size=3, protected={0})
    assert guarded == [[0], [2, 6, 7, 5], [4, 1, 3]]  # nothing merges into a super expert; 5 joins its nearest open centroid


@pytest.mark.parametrize("method", MERGING)
def test_merging_methods_keep_the_budget_and_every_expert_once(method):
    model = tiny_model("qwen2_moe")
    result = compress(model, method=method, ratio=0.5, calib=token_batches(), cache_dir=False)
    for lp in result.plan.layers:
        assert len(lp.keep) == 4
        assert sorted(e for g in lp.merges for e in g) == list(range(8))
    with torch.no_grad():
        assert torch.isfinite(result.model(IDS).logits).all()
    assert result.summary["experts_per_layer"] == {"1": 4, "2": 4}


def test_merging_composes_with_pruning_in_a_recipe(tmp_path):
    from moe_compress import load_model, run_recipe
    from tiny_checkpoints import save_tiny_checkpoint, write_calibration

    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", "qwen2_moe")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    report = run_recipe({
        "model": str(checkpoint),
        "calibration": {"source": str(calib), "samples": 8, "seq_len": 32},
        "evaluate": {"ppl": str(calib), "windows": 2, "seq_len": 32},
        "stages": [{"prune": {"method": "ream", "ratio": 0.25, "group_size": 0}}, {"prune": {"method": "reap", "ratio": 0.34}}],
    }, out=tmp_path / "out")
    assert [row["params"] for row in report["rows"]] == sorted((row["params"] for row in report["rows"]), reverse=True)
    plans = sorted(p.name for p in (tmp_path / "out" / "plans").iterdir() if p.suffix == ".json")
    assert plans == ["01-prune.json", "02-prune.json"]
    merged = Plan.load(tmp_path / "out" / "plans" / "01-prune.json")
    assert merged.method == "ream" and (tmp_path / "out" / "plans" / "01-prune.permutations.safetensors").is_file()
    assert Plan.load(tmp_path / "out" / "plans" / "02-prune.json").layers[0].num_experts == 6
    reloaded, _ = load_model(tmp_path / "out")
    assert reloaded.config.num_experts == 4 and reloaded.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 4


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("method", MERGING)
def test_streamed_merge_writes_the_same_bytes(tmp_path, family, method):
    """Merging (alignment reads expert weights layer by layer) gives the same checkpoint streamed as in memory."""
    import moe_compress as mc
    from test_streaming import _plan_without_fingerprint, _same_files

    tiny_model(family).save_pretrained(tmp_path / "source")
    plans = {}
    for streaming in (True, False):
        result = mc.compress(tmp_path / "source", method, 0.25, "layer", token_batches(), out=tmp_path / str(streaming), cache_dir=False,
                             streaming=streaming)
        plans[streaming] = result.plan
    assert _plan_without_fingerprint(plans[True].to_dict()) == _plan_without_fingerprint(plans[False].to_dict())
    assert plans[True].merge_permutations.keys() == plans[False].merge_permutations.keys()
    assert all(torch.equal(plans[True].merge_permutations[k], plans[False].merge_permutations[k]) for k in plans[True].merge_permutations)
    _same_files(tmp_path / "True", tmp_path / "False")
