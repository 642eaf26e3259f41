"""fit's block drop: the statistic that prices it, the solver's table with it, and the stages that make it, to the byte."""

from __future__ import annotations

import pytest
import torch
import transformers

import moe_compress as mc
from helpers import tensor_bytes
from moe_compress.arch.registry import get_adapter
from moe_compress.engine.prepare import calibration_batches
from moe_compress.fitting import search
from moe_compress.fitting.choices import BLOCK_DROPPED, DROPPED, Choice, block_rest, layer_choices, table
from moe_compress.fitting.fit_method import FitMethod
from moe_compress.fitting.proxies import BLOCK_ENERGY, LayerProxy
from moe_compress.fitting.solver import Option, solve
from moe_compress.source.load import load_model
from moe_compress.stages.sizes import candidate_bytes, checkpoint_sizes
from moe_compress.walk.observer import observe_expert_statistics
from tiny_checkpoints import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("blocks") / "tiny", "mixtral")


def test_the_block_statistic_is_each_layers_residual_update_summed_over_tokens(tmp_path):
    """`block_residual_energy` of each MoE layer is sum over batches of sum over tokens of ||h_out - h_in||^2, as a plain
    forward of the whole model gives h_in and h_out to hooks on the decoder layers (float64, batch by batch: the same bits)."""
    source = save_tiny_checkpoint(tmp_path / "source", "deepseek_v3")  # a dense first layer, shared experts
    model, tokenizer = load_model(str(source))
    adapter = get_adapter(model)
    batches = calibration_batches(mc.CalibrationSpec(samples=4, seq_len=32, batch_size=2), tokenizer, model.config)
    assert len(batches) == 2
    stats = observe_expert_statistics(model, adapter, batches, (BLOCK_ENERGY,))
    expected: dict[int, torch.Tensor] = {}
    layers = adapter.decoder_layers(model)

    def hook(index):
        def record(_module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            part = (after.double() - before.double()).pow(2).sum().reshape(1)
            expected[index] = part if index not in expected else expected[index] + part
        return record

    handles = [layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in range(len(layers))]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    assert sorted(stats) == [1, 2] and all(torch.equal(stats[i][BLOCK_ENERGY], expected[i]) for i in stats)
    assert all(float(stats[i][BLOCK_ENERGY]) > 0 for i in stats)


def test_the_solver_drops_a_block_where_that_is_cheapest_and_keeps_the_budget():
    """A dropped block weighs minus its rest against the fixed part (its attention leaves it). Fixed 200 bytes: under 260,
    layer 1's block dropped (-40, cost .2) and layer 0 kept is exactly 260, the cheapest; one byte less, the knapsack drops
    both blocks (120 bytes, cost .7), which `optimum` refuses (one MoE layer must route): layer 0's block dropped and
    layer 1 thinned (210 bytes, cost 1.5) beats the other way round (cost 3.2); 210 is the smallest routing total."""
    row0 = [Option(100, 0.0, "8x16b"), Option(50, 3.0, "4x16b"), Option(-40, 0.5, BLOCK_DROPPED.label)]
    row1 = [Option(100, 0.0, "8x16b"), Option(50, 1.0, "4x16b"), Option(-40, 0.2, BLOCK_DROPPED.label)]
    found = solve([row0, row1], 260, 200)
    assert found.labels == ("8x16b", BLOCK_DROPPED.label) and found.bytes == 260 and found.cost == 0.2
    found = solve([row0, row1], 259, 200)
    assert found.labels == (BLOCK_DROPPED.label, BLOCK_DROPPED.label) and found.bytes == 120 and found.cost == 0.5 + 0.2
    routed = search.optimum([row0, row1], 259, 200)
    assert routed.labels == (BLOCK_DROPPED.label, "4x16b") and routed.bytes == 210 and routed.cost == 1.5
    assert search.reachable([row0, row1], 200) == 210


def test_a_block_drop_is_a_choice_with_its_exact_bytes_and_stages(tiny, tmp_path):
    """Each MoE layer may drop its whole block: in the table it weighs minus the block's bytes besides its experts and
    router (attention at the other weights' width), and the stages -- prune, block drop, then quantize with the layers
    numbered as the drop leaves them -- predict the table's total and write exactly it; transformers reloads it, 2 layers."""
    sizes = checkpoint_sizes(tiny)
    choices = layer_choices(sizes, {i: [8, 4] for i in sizes.layers}, (16, 8, 4))
    assert all(options[-2:] == [BLOCK_DROPPED, DROPPED] for options in choices.values())
    for bits in (16, 8, 4):
        rows = table(sizes, choices, None, other_bits=bits)
        rest = sizes.blocks[0] - sizes.layers[0].experts * sizes.layers[0].expert_bytes[16] - sizes.layers[0].router_bytes
        assert rows[0][-2].bytes == -block_rest(sizes, 0, bits) == -(rest - (sizes.others[0][16] - sizes.others[0][bits]))
    allocation = {0: BLOCK_DROPPED, 1: Choice(4, 4), 2: Choice(8, 8)}
    stages = search.stages_for(allocation, sizes, FitMethod(), other_bits=8)
    assert [(s.kind, s.given()) for s in stages] == [("prune", {"method": "reap", "budget": "explicit", "keep": {0: 8, 1: 4, 2: 8}}),
                                                     ("drop", {"unit": "block", "layers": [0]}),
                                                     ("quantize", {"bits": 8, "scope": "all", "expert_bits": {0: 4}})]
    rows = table(sizes, {i: [c] for i, c in allocation.items()}, None, other_bits=8)
    predicted = search.fixed_bytes(sizes, 8) + sum(row[0].bytes for row in rows)
    by_hand = (sizes.total - sizes.blocks[0] - sum(sizes.layers[i].experts * sizes.layers[i].expert_bytes[16] + sizes.layers[i].router_bytes for i in (1, 2))
               + candidate_bytes(sizes.layers[1], 4, 4) + candidate_bytes(sizes.layers[2], 8, 8) - sum(sizes.others[i][16] - sizes.others[i][8] for i in (1, 2)))
    assert search.predicted_bytes(stages, sizes) == predicted == by_hand
    mc.compress(str(tiny), stages, out=tmp_path / "out", calib=mc.CalibrationSpec(samples=4, seq_len=32), evaluate={"ppl": False}, guard=False)
    assert tensor_bytes(tmp_path / "out") == by_hand
    # widths differ across layers: the generated code dequantises each (`slimming.expert_bits`)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert reloaded.config.num_hidden_layers == 2 and reloaded.config.quantization_config is not None


def test_the_block_cost_is_its_energy_over_the_experts_and_unobserved_is_not_offered(tiny):
    """cost(block dropped) = B_l / sum_e E_e, on the scale where the MoE sub-layer's drop costs 1; proxies without the
    statistic (B_l not observed) offer no block drop: it must never be priced free."""
    proxy = LayerProxy(1, torch.tensor([4.0, 1.0], dtype=torch.float64), {16: torch.zeros(2, dtype=torch.float64)}, {2: [0, 1]}, block=12.5)
    assert proxy.block_cost() == 2.5 and proxy.cost(0, 0) == 1.0
    sizes = checkpoint_sizes(tiny)
    unpriced = {i: LayerProxy(i, torch.ones(8, dtype=torch.float64), {16: torch.zeros(8, dtype=torch.float64)}, {8: list(range(8))}) for i in sizes.layers}
    assert not any(BLOCK_DROPPED in options for options in layer_choices(sizes, {i: [8] for i in sizes.layers}, (16,), unpriced).values())
