"""fit: explicit per-layer keep counts, the proxies against hand computations, the search end to end on a tiny checkpoint."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import moe_compress as mc
from helpers import rounded, tensor_bytes
from moe_compress import MoECompressError
from moe_compress.arch.registry import get_adapter
from moe_compress.fitting import api as fit_api, choices as fit_choices, search
from moe_compress.fitting.fit_method import FitMethod
from moe_compress.fitting.solver import Option, solve
from moe_compress.fitting.proxies import ENERGY, LayerProxy, layer_proxies, rounding_statistic
from moe_compress.fitting.report import spearman
from moe_compress.methods.budget import select_experts
from moe_compress.walk.rounding import round_to_nearest, rtn_output_error
from moe_compress.walk.routed_batch import RoutedBatch
from moe_compress.walk.statistics import STATISTICS
from moe_compress.plan import Plan, RoutingLimits
from moe_compress.stages.footprint import Footprint
from moe_compress.stages.sizes import CheckpointSizes, LayerSizes, candidate_bytes, checkpoint_sizes
from tiny_checkpoints import save_tiny_checkpoint
from tiny_models import tiny_model

TINY_CALIB = mc.CalibrationSpec(samples=4, seq_len=32)


# ---- explicit per-layer keep counts -------------------------------------------------------------
def test_explicit_budget_keeps_the_given_counts_best_scored_first():
    scores = {0: torch.tensor([0.5, 0.1, 0.9, 0.3]), 3: torch.tensor([0.2, 0.2, 0.8, 0.1])}
    kept = select_experts(scores, 0.0, "explicit", RoutingLimits(1), keep={0: 3, 3: 1})
    assert kept == {0: [0, 2, 3], 3: [2]}
    # ties remove the lower index first, as the other budgets do: of experts 0 and 1 (0.2 each), 1 stays
    assert select_experts(scores, 0.0, "explicit", RoutingLimits(1), keep={0: 4, 3: 2}) == {0: [0, 1, 2, 3], 3: [1, 2]}


def test_explicit_budget_refusals():
    scores = {0: torch.rand(8), 1: torch.rand(8)}
    with pytest.raises(MoECompressError, match=r"needs a kept count for every MoE layer .* layer 1 has none"):
        select_experts(scores, 0.0, "explicit", RoutingLimits(2), keep={0: 4})
    with pytest.raises(MoECompressError, match=r"layer 0 cannot keep 1 of its 8 experts: keep a multiple of its 1 routing group\(s\) from 2"):
        select_experts(scores, 0.0, "explicit", RoutingLimits(2), keep={0: 1, 1: 4})
    with pytest.raises(MoECompressError, match=r"layer 1 cannot keep 3 of its 8 experts: keep a multiple of its 2 routing group"):
        select_experts(scores, 0.0, "explicit", RoutingLimits(2, groups=2), keep={0: 4, 1: 3})
    with pytest.raises(MoECompressError, match=r"keep names layer\(s\) \[5\], which are not MoE layers"):
        select_experts(scores, 0.0, "explicit", RoutingLimits(2), keep={0: 4, 1: 4, 5: 2})


def test_prune_stage_with_explicit_keep(tmp_path):
    """Counts as given, the experts the method scores lowest removed, predicted bytes as saved, and methods that set
    their own counts refused before calibrating."""
    source = save_tiny_checkpoint(tmp_path / "tiny", "mixtral")
    keep = {0: 8, 1: 5, 2: 2}
    stage = mc.Prune("frequency", budget="explicit", keep=keep)
    result = mc.compress(str(source), [stage], calib=TINY_CALIB, out=tmp_path / "out")
    plan = result.plans[0][1]
    assert plan.kept_counts() == keep and plan.budget == "explicit" and plan.ratio == pytest.approx(1 - 15 / 24)
    for layer in plan.layers:  # the kept ones are the best-scored (frequency), ties to the higher index
        order = sorted(range(layer.num_experts), key=lambda e: (layer.scores[e], e))
        assert sorted(layer.keep) == sorted(order[layer.num_experts - keep[layer.layer]:])
    sizes = checkpoint_sizes(source)
    assert stage.predict(Footprint.of(sizes)).bytes == tensor_bytes(tmp_path / "out") == sizes.fixed + sum(
        candidate_bytes(sizes.layers[i], k, 16) for i, k in keep.items())
    with pytest.raises(MoECompressError, match=r"method 'cprune-cosine' decides its per-layer counts itself"):
        mc.compress(str(source), [mc.Prune("cprune-cosine", budget="explicit", keep=keep)], calib=TINY_CALIB)
    with pytest.raises(MoECompressError, match=r"keep sets each layer's count under budget 'explicit'"):
        mc.compress(str(source), [mc.Prune("reap", keep=keep)], calib=TINY_CALIB)


# ---- proxies -------------------------------------------------------------------------------------
def test_round_to_nearest_is_the_independent_rounding():
    weight = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for bits, group in ((4, 16), (8, 32), (4, 8)):
        assert torch.equal(round_to_nearest(weight, bits, group), rounded(weight, bits, group))


def test_layer_codes_give_each_experts_rounding_with_scales_in_one_block():
    """The kept codes widen to exactly `round_to_nearest` of each expert's slice (either layout), and their scales sit in
    one tensor per weight: a small block per expert, kept while each expert's float32 temporaries come and go, split
    the heap's freed blocks so the next expert's could not reuse them (bench/results/fit_scale.md: calibration peaks of 3.9-4.7 GiB against 3.4-3.7)."""
    from moe_compress.walk.rounding import _Codes

    stack = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    for transposed in (False, True):
        for bits, group in ((8, 16), (4, 8)):
            codes = _Codes(stack, bits, group, transposed)
            assert codes.scales.shape[0] == codes.zero_points.shape[0] == 3 and codes.codes.dtype == torch.int8
            for e in range(3):
                expected = round_to_nearest(stack[e].T, bits, group).T if transposed else round_to_nearest(stack[e], bits, group)
                assert torch.equal(codes[e], expected.float())


def _mixtral_expert(experts, e: int, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Mixtral's expert written out by hand: silu(x W_g^T) * (x W_u^T), then W_d."""
    gate, up = (x @ gate_up[e].float().T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down[e].float().T


def test_rounding_and_energy_statistics_by_hand():
    """rtn_output_error@16 and gated_output_energy on a hand-made routing: sums of w^2 ||f^Q - f||^2 and (w ||f||)^2."""
    model = tiny_model("mixtral").to(torch.bfloat16)
    adapter = get_adapter(model)
    experts = adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[0]))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, experts.gate_up_proj.shape[-1], generator=generator).to(experts.gate_up_proj.dtype)
    top_idx = torch.tensor([[0, 3], [3, 1], [0, 1], [7, 3], [0, 7]])
    top_w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    batch = RoutedBatch(x, torch.zeros(5, 8), top_idx, top_w, adapter, experts)
    errors = rtn_output_error(16)(batch)
    energy = STATISTICS[ENERGY].update(batch)
    expected_errors, expected_energy = torch.zeros(8, 2, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    with torch.no_grad():
        for t in range(5):
            for slot in range(2):
                e, w = int(top_idx[t, slot]), float(top_w[t, slot])
                exact = _mixtral_expert(experts, e, x[t : t + 1].float(), experts.gate_up_proj, experts.down_proj)
                expected_energy[e] += (w * float(exact.double().norm())) ** 2
                for column, bits in enumerate((8, 4)):
                    q = _mixtral_expert(experts, e, x[t : t + 1].float(), rounded(experts.gate_up_proj, bits, 16), rounded(experts.down_proj, bits, 16))
                    expected_errors[e, column] += w**2 * float((q - exact).double().pow(2).sum())
    assert torch.allclose(errors, expected_errors, rtol=1e-4, atol=1e-12)
    assert torch.allclose(energy, expected_energy, rtol=1e-2)  # the layer's own bf16 outputs against a float32 recomputation
    routed = [0, 1, 3, 7]
    assert errors[[2, 4, 5, 6]].abs().sum() == 0 and (errors[routed, 1] > errors[routed, 0]).all() and (errors[routed, 0] > 0).all()


def test_layer_cost_by_hand():
    """cost(k, b) = (energy of the removed + rounding error of the kept at b bits) / the layer's energy."""
    proxy = LayerProxy(4, torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64),
                       {16: torch.zeros(4, dtype=torch.float64), 8: torch.tensor([0.01, 0.02, 0.03, 0.04], dtype=torch.float64),
                        4: torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64)},
                       {4: [0, 1, 2, 3], 3: [0, 2, 3], 2: [0, 2]})
    assert proxy.cost(4, 16) == 0.0
    assert proxy.cost(4, 8) == pytest.approx(0.1 / 10)
    assert proxy.cost(3, 16) == pytest.approx(1.0 / 10)
    assert proxy.cost(2, 4) == pytest.approx((1.0 + 2.0 + 0.5 + 0.7) / 10)


def test_layer_proxies_from_hand_made_statistics():
    """REAP's order (reap_sum / selected, the model's renormalisation) picks the removed experts; the cost follows."""
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    layer = {"reap_sum": torch.tensor([8.0, 1.0, 9.0, 2.0, 6.0, 3.0, 5.0, 4.0], dtype=torch.float64),
             "reap_prob_sum": torch.ones(8, dtype=torch.float64), "selected": torch.ones(8, dtype=torch.float64),
             "max_output_abs": torch.ones(8, dtype=torch.float64),  # the guard's statistic: no super expert
             ENERGY: torch.arange(1.0, 9.0, dtype=torch.float64),
             rounding_statistic(16): torch.stack([torch.full((8,), 0.01), torch.full((8,), 0.1)], dim=1).double()}
    stats = {i: layer for i in adapter.moe_layer_indices(model)}
    proxies = layer_proxies(FitMethod(), adapter, model.config, stats, 16)
    proxy = proxies[0]
    top_k = adapter.top_k(model.config)
    assert sorted(proxy.kept) == list(range(top_k, 9))
    assert proxy.kept[3] == [0, 2, 4]  # the three best REAP scores: 9, 8, 6
    removed_energy = 36.0 - (1 + 3 + 5)
    assert proxy.cost(3, 4) == pytest.approx((removed_energy + 3 * 0.1) / 36.0)


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)  # rank differences 0, 1, 1: 1 - 6 x 2 / (3 x 8)
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


# ---- the candidates, on hand-made sizes and proxies ----------------------------------------------
def _hand_sizes() -> CheckpointSizes:
    """Two MoE layers of 4 experts (100 / 50 / 25 bytes each at 16 / 8 / 4 bits, no router bytes), and other
    weights of 400 / 200 / 100 bytes at 16 / 8 / 4 bits within a fixed part of 1000 bytes: 1800 in all."""
    layers = {i: LayerSizes(i, 4, {16: 100, 8: 50, 4: 25}, 0, 0) for i in (0, 1)}
    return CheckpointSizes(1800, 16, layers, {0: 900, 1: 900}, {0: {16: 400, 8: 200, 4: 100}})


def _hand_proxies() -> dict[int, LayerProxy]:
    """Each expert: energy 1, rounding error 0.01 at 8 bits and 0.1 at 4: a layer costs 0.01 at 8 bits, 0.1 at 4."""
    rounding = {16: torch.zeros(4, dtype=torch.float64), 8: torch.full((4,), 0.01, dtype=torch.float64), 4: torch.full((4,), 0.1, dtype=torch.float64)}
    return {i: LayerProxy(i, torch.ones(4, dtype=torch.float64), rounding, {4: [0, 1, 2, 3]}) for i in (0, 1)}


def test_the_optimum_is_measured_at_every_width_of_the_other_weights(monkeypatch):
    """Budget 1300: with the other weights at 16 bits (fixed 1000) the experts take at most 300 bytes -- layers at 8 and
    4 bits, proxy 0.11; at 8 bits (fixed 800), 500 -- both layers at 8 bits, 0.02 + 0.005; at 4 bits (fixed 700), 600 --
    16 and 8 bits, 0.01 + 0.05. All three are measured, the least proxy named "fit", then the front beside it.
    (Whole-layer widths only: widths per expert are `test_per_expert_widths_*`'s.)"""
    monkeypatch.setattr(fit_choices, "PER_EXPERT_BITS", False)
    sizes, proxies, floors = _hand_sizes(), _hand_proxies(), {0: [4], 1: [4]}
    found = search.solved(sizes, floors, proxies, 1300, FitMethod(), {16: 0.0, 8: 0.005, 4: 0.05})
    summary = [(c.name, c.other_bits, {i: ch.bits for i, ch in c.allocation.items()}, c.bytes) for c in found]
    assert summary == [("fit", 8, {0: 8, 1: 8}, 1200), ("fit, other weights 4-bit", 4, {0: 16, 1: 8}, 1300),
                       ("fit, other weights 16-bit", 16, {0: 8, 1: 4}, 1300),
                       ("fit (front 1)", 8, {0: 4, 1: 8}, 1100), ("fit (front 2)", 8, {0: 4, 1: 4}, 1000)]
    assert [c.proxy for c in found] == pytest.approx([0.025, 0.06, 0.11, 0.115, 0.205])
    assert all(search.predicted_bytes(c.stages, sizes) == c.bytes for c in found)
    # with the single methods: every decoder weight at 8 bits is the optimum itself (an alias), 4-bit alone is measured beside it
    named = {c.name: c.aliases for c in search.candidates(sizes, floors, proxies, 1300, FitMethod(), {16: 0.0, 8: 0.005, 4: 0.05})}
    assert named == {"fit": ["8-bit alone, every decoder weight"], "fit, other weights 4-bit": [], "fit, other weights 16-bit": [],
                     "fit (front 1)": [], "fit (front 2)": [], "4-bit alone": []}


def test_the_optimum_leaves_a_moe_layer_routing():
    """Dropping both layers (cost 2, 0 bytes) is the knapsack's optimum under 60 bytes, but a plan must leave a MoE layer
    routing: the best with one layer denied its drop is taken (50 bytes, cost 4; layer 0 the first tried on the tie)."""
    row = [Option(100, 0.0, "8x16b"), Option(50, 3.0, "4x16b"), Option(0, 1.0, fit_choices.DROPPED.label)]
    assert solve([row, row], 60).labels == ("dropped", "dropped")
    found = search.optimum([row, row], 60, 0)
    assert found.labels == ("4x16b", "dropped") and found.bytes == 50 and found.cost == 4.0
    assert search.reachable([row, row], 7) == 57


# ---- the search, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("fit") / "tiny", "mixtral")


def test_fit_writes_a_model_within_the_budget(tiny, tmp_path):
    """The artifact fits (saved tensor bytes <= budget), its bytes are the chosen allocation's prediction, the
    single-method baselines were measured beside it, and the report and the plan record the search."""
    budget = int(tensor_bytes(tiny) * 0.7)
    result = mc.fit(str(tiny), memory=budget, calib=TINY_CALIB, out=tmp_path / "out", windows=2, seq_len=32)
    saved = tensor_bytes(tmp_path / "out")
    assert saved <= budget and saved == result.best.bytes == result.best.measured["written_bytes"]
    assert result.best.measured["kl"] == min(c.measured["kl"] for c in result.candidates)
    names = {name for c in result.candidates for name in [c.name, *c.aliases]}
    assert {"fit", "8-bit alone", "4-bit alone"} <= names and any(n.startswith("reap alone") for n in names)
    assert all(c.bytes <= budget for c in result.candidates)
    report = json.loads((tmp_path / "out" / "fit_report.json").read_text())
    assert report["chosen"] == result.best.name and len(report["candidates"]) == len(result.candidates)
    assert "| MoE layer | experts kept | bits |" in (tmp_path / "out" / "fit_report.md").read_text()
    for path in (tmp_path / "out" / "plans").glob("*.json"):
        assert Plan.load(path).meta["fit"]["chosen"] == result.best.name


def test_budget_at_or_above_the_original_returns_it_unchanged(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr("moe_compress.engine.statistics.collect_statistics", _never)
    result = mc.fit(str(tiny), target_ratio=1.0, calib=TINY_CALIB, out=tmp_path / "out")
    assert result.unchanged and result.best is None and result.candidates == []
    assert tensor_bytes(tmp_path / "out") == tensor_bytes(tiny)
    assert json.loads((tmp_path / "out" / "fit_report.json").read_text())["unchanged"] is True


def _never(*args, **kwargs):
    raise AssertionError("calibrated")


def test_unreachable_budget_is_refused_before_calibration(tiny, monkeypatch):
    monkeypatch.setattr("moe_compress.source.load.load_model", _never)
    sizes = checkpoint_sizes(tiny)
    top_k = 2
    # every MoE layer's whole block but one dropped (block drop is a choice of the search: the block's every tensor gone), the
    # first (the layers are alike, the first tried wins) at its fewest experts, 4 bits, its attention at 4 bits too
    first = sizes.layers[0]
    smallest = (sizes.total - sizes.blocks[1] - sizes.blocks[2] - first.experts * first.expert_bytes[16] - first.router_bytes
                + candidate_bytes(first, top_k, 4) - (sizes.others[0][16] - sizes.others[0][4]))
    with pytest.raises(MoECompressError, match=rf"below the smallest size fit can reach, .* \({smallest} bytes: every MoE layer's whole block but one dropped, "
                                               rf"that one at {top_k} experts, 4 bits, the other decoder weights at 4 bits too\)"):
        mc.fit(str(tiny), memory=smallest - 1)
    assert fit_api.plan_budget(str(tiny), memory=smallest).smallest_bytes == smallest  # exactly the smallest is reachable


def test_a_budget_only_lowering_attention_reaches_is_reached(tiny, tmp_path):
    """Below every allocation of the routed experts alone (each layer at 2 experts, 4 bits, attention as stored), fit
    lowers the other decoder weights too (quantize's scope "all"): the written model fits, weighs its prediction, and
    its card shows the search (the allocation, the other weights' width, every candidate measured)."""
    sizes = checkpoint_sizes(tiny)
    experts_only = sizes.fixed + sum(candidate_bytes(layer, 2, 4) for layer in sizes.layers.values())
    result = mc.fit(str(tiny), memory=experts_only - 1, calib=TINY_CALIB, out=tmp_path / "out", windows=2, seq_len=32)
    best = result.best
    quantize = best.stages[-1]
    assert best.other_bits in (8, 4) and quantize.kind == "quantize" and quantize.scope == "all" and quantize.bits == best.other_bits
    assert tensor_bytes(tmp_path / "out") == best.bytes == best.measured["written_bytes"] < experts_only
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Budget search" in card and "| MoE layer | experts kept | bits |" in card
    assert f"Other decoder weights (attention, shared experts, dense MLPs): {best.other_bits} bits." in card
    assert all(f"| {c.bytes} | {c.proxy:.4g} | {c.measured['kl']:.4g} |" in card for c in result.candidates)


def test_dry_run_calibrates_nothing(tiny, monkeypatch):
    monkeypatch.setattr("moe_compress.source.load.load_model", _never)
    result = mc.fit(str(tiny), target_ratio=0.5, dry_run=True)
    assert result.best is None and result.floors == {0: list(range(2, 9)), 1: list(range(2, 9)), 2: list(range(2, 9))}
    assert result.budget == tensor_bytes(tiny) // 2


def test_command_dry_run_prints_the_search_space(tiny, monkeypatch, capsys):
    from moe_compress.fitting.command import FitSettings, fit_command

    monkeypatch.setattr("moe_compress.source.load.load_model", _never)
    sizes = checkpoint_sizes(tiny)
    assert fit_command(str(tiny), FitSettings(target_ratio=0.5), dry_run=True) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"original weights: {sizes.total} bytes ({printed[0].split('(')[1]}"
    assert f"weights may take: {sizes.total // 2} bytes" in printed[2]
    assert printed[4].startswith("search space: 3 MoE layers, each keeping 2..8 experts (step 1), at 16 / 8 / 4 bits")
    assert printed[4].endswith(", or its whole decoder block dropped or its routed MoE alone (one MoE layer left routing)")
    assert printed[5] == "other decoder weights (attention, shared experts, dense MLPs): 16 / 8 / 4 bits"
    with pytest.raises(MoECompressError, match=r"give out DIR"):
        fit_command(str(tiny), FitSettings(target_ratio=0.5))


def test_the_fit_command_prints_the_search_space_and_refuses_what_it_cannot_do(tiny, tmp_path):
    from typer.testing import CliRunner

    from moe_compress.cli import app

    runner = CliRunner()
    dry = runner.invoke(app, ["fit", str(tiny), "--target-ratio", "0.5", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "smallest reachable:" in dry.output and "at 16 / 8 / 4 bits" in dry.output
    no_out = runner.invoke(app, ["fit", str(tiny), "--target-ratio", "0.5"])
    assert no_out.exit_code == 2 and "give --out DIR" in no_out.output
    too_small = runner.invoke(app, ["fit", str(tiny), "--memory", "1KB", "--out", str(tmp_path / "out")])
    assert too_small.exit_code == 2 and "smallest" in too_small.output and not (tmp_path / "out").exists()


def test_the_written_plan_replays_the_artifact(tiny, tmp_path):
    """`prune --plan-in` with the plan fit wrote, then the same quantize stage, gives the artifact's tensors exactly."""
    from safetensors import safe_open
    from typer.testing import CliRunner

    from moe_compress.cli import app

    sizes = checkpoint_sizes(tiny)
    every_expert_at_4_bits = sizes.fixed + sum(block[4] - block[16] for block in sizes.others.values()) + sum(
        candidate_bytes(layer, layer.experts, 4) for layer in sizes.layers.values())
    result = mc.fit(str(tiny), memory=every_expert_at_4_bits - 1, calib=TINY_CALIB, out=tmp_path / "fit", windows=2, seq_len=32)
    kinds = [stage.kind for stage in result.best.stages]
    assert kinds == ["prune", "quantize"], kinds  # below every weight at 4 bits this model needs both
    replay = CliRunner().invoke(app, ["prune", str(tiny), "--plan-in", str(tmp_path / "fit" / "plans" / "01-prune.json"),
                                      "--out", str(tmp_path / "pruned"), "--no-guard"])
    assert replay.exit_code == 0, replay.output
    mc.compress(str(tmp_path / "pruned"), [result.best.stages[1]], calib=TINY_CALIB, out=tmp_path / "replayed", guard=False)

    def tensors(directory: Path) -> dict:
        found = {}
        for shard in sorted(directory.glob("*.safetensors")):
            with safe_open(shard, "pt") as handle:
                found |= {key: handle.get_tensor(key) for key in handle.keys()}
        return found

    fitted, replayed = tensors(tmp_path / "fit"), tensors(tmp_path / "replayed")
    assert fitted.keys() == replayed.keys() and all(torch.equal(fitted[key], replayed[key]) for key in fitted)


def test_layer_drop_is_a_choice_with_its_exact_bytes(tiny):
    """Each MoE layer of the tiny Mixtral (nothing in its MoE sub-layer but routed experts and router) may drop them:
    0 bytes in the table, cost 1 (every expert's energy gone), and the Drop stage's prediction is the table's total."""
    sizes = checkpoint_sizes(tiny)
    choices = fit_choices.layer_choices(sizes, {i: [8, 2] for i in sizes.layers}, (16, 4))
    assert all(options[-1] == fit_choices.DROPPED and fit_choices.DROPPED not in options[:-1] for options in choices.values())
    rows = fit_choices.table(sizes, choices, None)
    assert [row[-1].bytes for row in rows] == [0, 0, 0]
    allocation = {0: search.Choice(2, 4), 1: fit_choices.DROPPED, 2: search.Choice(8, 16)}
    stages = search.stages_for(allocation, sizes, FitMethod())
    assert [(s.kind, s.given()) for s in stages] == [("prune", {"method": "reap", "budget": "explicit", "keep": {0: 2, 1: 8, 2: 8}}),
                                                     ("drop", {"layers": [1]}), ("quantize", {"bits": 4, "scope": "experts", "expert_bits": {2: 16}})]
    assert search.predicted_bytes(stages, sizes) == sizes.fixed + candidate_bytes(sizes.layers[0], 2, 4) + candidate_bytes(
        sizes.layers[2], 8, 16)
    proxy = LayerProxy(1, torch.tensor([4.0, 1.0], dtype=torch.float64), {16: torch.zeros(2, dtype=torch.float64)}, {2: [0, 1]})
    assert proxy.cost(0, 0) == 1.0
    with_shared = CheckpointSizes(sizes.total, sizes.group_size, {i: dataclasses.replace(layer, rest_bytes=64) for i, layer in sizes.layers.items()},
                                  sizes.blocks, sizes.others, moe_droppable=True)
    assert not any(fit_choices.DROPPED in options for options in fit_choices.layer_choices(with_shared, {i: [8] for i in sizes.layers}, (16,)).values())


def test_drop_stage_takes_the_layers_it_drops(tiny):
    """`Drop(layers=...)` (a command line's "2,0" alike) predicts exactly those MoE sub-layers gone, and refuses layers
    given with a count, twice, or all of them (one must keep routing)."""
    from moe_compress.preflight import skeleton

    sizes = checkpoint_sizes(tiny)
    predicted = mc.Drop(layers="2,0").predict(Footprint.of(sizes))
    assert predicted.keep == {1: 8} and predicted.exact and predicted.bytes == sizes.fixed + candidate_bytes(sizes.layers[1], 8, 16)
    with pytest.raises(MoECompressError, match=r"layers names the MoE sub-layers \(or, unit block, the blocks\) to drop: give it without n or target_ratio"):
        mc.Drop.check_options(mc.Drop.defaults() | {"layers": [1], "n": 1})
    with pytest.raises(MoECompressError, match=r"each once"):
        mc.Drop.check_options(mc.Drop.defaults() | {"layers": "1,1"})
    with pytest.raises(MoECompressError, match=r"one must keep routing\); asked for layers \[0, 1, 2\]"):
        mc.Drop(layers=[0, 1, 2]).check(skeleton(str(tiny), "auto", False), [])


def test_a_budget_only_dropping_reaches_drops_a_layer(tiny, tmp_path):
    """Below every allocation that keeps each MoE layer (each at 2 experts, 4 bits, attention at 4 bits too), fit drops a
    layer's routed MoE: the written model weighs its prediction, reloads with that layer's MoE gone, and its report and
    card show the drop in the allocation (0 experts, 0 bits)."""
    from moe_compress.source.load import load_model

    sizes = checkpoint_sizes(tiny)
    kept_all = sizes.fixed + sum(block[4] - block[16] for block in sizes.others.values()) + sum(
        candidate_bytes(layer, 2, 4) for layer in sizes.layers.values())
    result = mc.fit(str(tiny), memory=kept_all - 1, calib=TINY_CALIB, out=tmp_path / "out", windows=2, seq_len=32)
    best = result.best
    dropped = sorted(i for i, c in best.allocation.items() if c.dropped)
    assert dropped
    drop = next(s for s in best.stages if s.kind == "drop")
    assert drop.layers == dropped
    assert tensor_bytes(tmp_path / "out") == best.bytes == best.measured["written_bytes"] < kept_all
    model, _ = load_model(tmp_path / "out")
    adapter = get_adapter(model)
    assert [i for i in sizes.layers if adapter.moe_block(adapter.decoder_layers(model)[i]) is None] == dropped
    report = json.loads((tmp_path / "out" / "fit_report.json").read_text())
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    assert all(chosen["allocation"][str(i)] == {"keep": 0, "bits": 0} for i in dropped)
    card = (tmp_path / "out" / "README.md").read_text()
    assert all(f"| {i} | 0 | 0 |" in card for i in dropped)
