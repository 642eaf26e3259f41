"""Calibration routed to every expert (--calibrate-all-experts): unreached experts get statistics, the output and routing stay the model's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import selected_experts
from moe_compress import get_adapter
from moe_compress.cli import app
from moe_compress.slimming.observe import layer_collector, prune_layer_by_layer
from moe_compress.walk.all_experts import dense_routing, route_to_every_expert
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import tiny_model

BATCH = torch.tensor([[5, 17, 42]])  # 3 tokens, top-2 of 8 experts: at least 2 experts per layer get none


def test_dense_routing_keeps_the_routers_weights_and_zeros_the_rest():
    every, weights = dense_routing(torch.tensor([[2, 0], [1, 3]]), torch.tensor([[0.75, 0.25], [0.5, 0.5]]), 4)
    assert every.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert weights.tolist() == [[0.25, 0.0, 0.75, 0.0], [0.0, 0.5, 0.0, 0.5]]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_every_expert_sees_every_token_and_the_output_is_the_models(family):
    model = tiny_model(family).eval()
    adapter = get_adapter(model)
    chosen = selected_experts(model, adapter, BATCH)
    with torch.no_grad():
        reference = model(BATCH).logits
    stats = {}
    for routed_to_all in (False, True):
        def collector(index, layer, routed_to_all=routed_to_all):
            made = layer_collector(adapter, layer, index, ("experts",), "norms", routed_to_all)
            stats[routed_to_all, index] = made.stats
            return made

        for _ in prune_layer_by_layer(model, adapter, [BATCH], collector, lambda c: None, propagate=False):
            pass
    for index, picked in chosen.items():
        for name, seen in stats[False, index].items():
            expert = int(name.split("[")[1].rstrip("]"))
            assert seen.tokens == (sum(1 for row in _routes(model, adapter, index) if expert in row) if expert in picked else 0), name
            assert stats[True, index][name].tokens == 3, name  # every token, reached or not
        assert any(s.tokens == 0 for s in stats[False, index].values())  # some expert was unreached ...
    handles = [route_to_every_expert(adapter.experts(adapter.moe_block(layer))) for layer in adapter.decoder_layers(model)
               if adapter.moe_block(layer) is not None]
    with torch.no_grad():
        dense = model(BATCH).logits
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(dense, reference, rtol=1e-5, atol=1e-6)  # ... and the layer's output is its own


def _routes(model, adapter, index: int) -> list[list[int]]:
    """Per token of BATCH, the experts layer `index`'s router picks."""
    rows = []
    router = adapter.router(adapter.moe_block(adapter.decoder_layers(model)[index]))
    handle = router.register_forward_hook(lambda _m, _a, output: rows.extend(output[2].reshape(-1, output[2].shape[-1]).tolist()))
    with torch.no_grad():
        model(BATCH)
    handle.remove()
    return rows


def test_slim_names_unreached_experts_and_routing_calibration_to_all_of_them_passes_the_guard(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    calib = write_calibration(tmp_path / "calib.jsonl", documents=60)
    args = ["slim", str(checkpoint), "--method", "wanda", "--calib", str(calib), "--samples", "1", "--seq-len", "3", "--batch-size", "1",
            "--guard-min-top1", "0"]
    runner = CliRunner()
    plain = runner.invoke(app, [*args, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 2, plain.output
    summary = json.loads((tmp_path / "plain" / "moe_compress_summary.json").read_text())
    unreached = summary["unreached_experts"]
    assert len(unreached) >= 2 * 3 and summary["guard"]["unreached_experts"] == unreached and not summary["guard"]["passed"]
    assert summary["reached"]["experts"]["no_calibration_tokens"] == 2 * len(unreached)  # gate_up and down of each
    message = " ".join(plain.output.split())
    assert f"{len(unreached)} expert(s) never received a calibration token" in message and "--calibrate-all-experts" in message
    assert f"layer:expert {', '.join(unreached[:12])}" in message

    routed = runner.invoke(app, [*args, "--out", str(tmp_path / "all"), "--calibrate-all-experts"])
    assert routed.exit_code == 0, routed.output
    summary = json.loads((tmp_path / "all" / "moe_compress_summary.json").read_text())
    assert summary["unreached_experts"] == [] and summary["guard"]["unreached_experts"] == [] and summary["guard"]["passed"]
    assert summary["calibrate_all_experts"] is True and summary["reached"]["experts"]["no_calibration_tokens"] == 0
    # the routing saved is the input's: the same routers and config
    before, after = load_file(checkpoint / "model.safetensors"), load_file(tmp_path / "all" / "model.safetensors")
    routers = [name for name in before if name.endswith("gate.weight") and ".experts." not in name]
    assert routers and all(torch.equal(before[name], after[name]) for name in routers)
    config = json.loads((tmp_path / "all" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 2)

    allowed = runner.invoke(app, [*args, "--out", str(tmp_path / "allowed"), "--allow-unreached-experts"])
    assert allowed.exit_code == 0, allowed.output
    guard = json.loads((tmp_path / "allowed" / "moe_compress_summary.json").read_text())["guard"]
    assert guard["passed"] and guard["allow_unreached"] and guard["unreached_experts"] == unreached
