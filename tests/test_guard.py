"""The quality guard: a broken quantisation fails and names its layer, an honest one passes, unreached experts are named."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import calm, selected_experts
from moe_compress import CalibrationSpec, MoECompressError, get_adapter, quantize
from moe_compress.data import calibration_batches, held_out_windows, token_stream, windows
from moe_compress.data.texts import iter_documents
from moe_compress.errors import QualityGuardError
from moe_compress.evaluate.fidelity import FidelityResult
from moe_compress.evaluate.guard import GuardReport, guard, unreached_experts
from moe_compress.source.open import open_model
from moe_compress.walk import observe_expert_statistics
from moe_compress.text.guard_card import guard_lines
from tiny_checkpoints import tiny_tokenizer, write_calibration
from tiny_models import VOCAB, tiny_model

WINDOWS = torch.randint(3, VOCAB, (8, 24), generator=torch.Generator().manual_seed(5))
BROKEN = "model.layers.1.self_attn.o_proj.weight_scale"


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
    """A calm tiny Mixtral, its honest 8-bit checkpoint, and a copy of that with layer 1's o_proj scale x 100."""
    root = tmp_path_factory.mktemp("guard")
    model = calm(tiny_model("mixtral")).eval()
    quantize(model, root / "q8", bits=8, group_size=16)
    shutil.copytree(root / "q8", root / "broken")
    tensors = load_file(root / "broken" / "model.safetensors")
    tensors[BROKEN] = tensors[BROKEN] * 100
    save_file(tensors, root / "broken" / "model.safetensors", metadata={"format": "pt"})
    return model, root


def test_held_out_windows_are_the_calibration_texts_windows_the_shuffle_did_not_pick(tmp_path):
    source, tokenizer = write_calibration(tmp_path / "c.jsonl", documents=60), tiny_tokenizer()
    spec = CalibrationSpec(str(source), samples=10, seq_len=16, seed=3, batch_size=4)
    every = windows(token_stream(tokenizer, iter_documents(str(source))), 16)
    order = torch.randperm(len(every), generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.cat(calibration_batches(tokenizer, spec)), every[order[:10]])
    assert torch.equal(held_out_windows(tokenizer, spec, 5), every[order[10:15]])
    assert torch.equal(held_out_windows(tokenizer, spec, 10**6), every[order[10:]])  # as many as there are
    with pytest.raises(MoECompressError, match=f"only the {len(every)} windows calibration uses"):
        held_out_windows(tokenizer, CalibrationSpec(str(source), samples=len(every), seq_len=16), 5)


def test_an_honest_8_bit_quantisation_passes(quantised):
    model, root = quantised
    report = guard(model, root / "q8", WINDOWS, stage="quantize")
    assert report.passed and report.min_top1 == 0.9 and report.fidelity.tokens == 8 * 23
    assert report.fidelity.top1_agreement > 0.98 and report.fidelity.kl < 1e-4
    assert report.layer_errors is None  # localised only on failure
    assert report.failure() == ""


def test_streaming_on_streams_the_input_and_loads_a_compressed_tensors_output_whole(quantised, tmp_path):
    """A command run with --streaming on guards with it: the input is read layer by layer, and quantize's output, which the
    streamed reader does not dequantise, is loaded whole rather than refused."""
    model, root = quantised
    model.save_pretrained(tmp_path / "original")
    whole = guard(model, root / "q8", WINDOWS, stage="quantize")
    streamed = guard(tmp_path / "original", root / "q8", WINDOWS, stage="quantize", streaming=True)
    assert streamed.passed and streamed.fidelity.tokens == whole.fidelity.tokens == 8 * 23
    assert streamed.fidelity.top1_agreement == whole.fidelity.top1_agreement
    assert streamed.fidelity.kl == pytest.approx(whole.fidelity.kl, rel=1e-4)


def test_a_scale_multiplied_by_100_fails_the_guard_which_names_that_layer(quantised):
    model, root = quantised
    with pytest.raises(QualityGuardError) as failed:
        guard(model, root / "broken", WINDOWS, stage="quantize")
    report = failed.value.report
    message = str(failed.value)
    assert "\n" not in message and message.startswith("quality guard failed after quantize: top-1 agreement ")
    assert f"{report.fidelity.top1_agreement:.3f} < 0.9 " in message and "worst layer 1 " in message and "--guard-min-top1" in message
    assert report.fidelity.top1_agreement < 0.9
    assert report.worst_layers(1)[0][0] == 1
    assert report.layer_errors[1] > 10 and report.layer_errors[0] < 0.05 and report.layer_errors[2] < 0.05
    assert report.to_dict()["failure"] == message
    # the override: a threshold of 0 passes the same checkpoint
    assert guard(model, root / "broken", WINDOWS, stage="quantize", min_top1=0).passed


def test_layer_errors_of_an_identical_model_are_zero_and_a_streamed_input_gives_the_same_numbers(quantised, tmp_path):
    model, root = quantised
    same = guard(model, copy.deepcopy(model), WINDOWS, localise=True)
    assert same.fidelity.kl == pytest.approx(0, abs=1e-7) and same.fidelity.top1_agreement == 1.0
    assert same.layer_errors == {0: 0.0, 1: 0.0, 2: 0.0}
    model.save_pretrained(tmp_path / "original")
    in_memory = guard(model, root / "broken", WINDOWS, stage="quantize", localise=True, raise_on_failure=False)
    _, _, original = open_model(tmp_path / "original", streaming=True)  # read layer by layer; the quantised output as reloaded
    assert original.streamed
    streamed = guard(original, root / "broken", WINDOWS, stage="quantize", raise_on_failure=False)
    assert streamed.fidelity.top1_agreement == in_memory.fidelity.top1_agreement
    assert streamed.fidelity.kl == pytest.approx(in_memory.fidelity.kl, rel=1e-4)
    assert streamed.layer_errors == pytest.approx(in_memory.layer_errors, rel=1e-4)


def test_experts_calibration_never_reached_are_named_and_fail_unless_allowed():
    model = tiny_model("mixtral").eval()
    adapter = get_adapter(model)
    batch = torch.tensor([[5, 17, 42]])  # 3 tokens, top-2 of 8 experts: at least 2 experts per layer get none
    stats = observe_expert_statistics(model, adapter, [batch], ("selected",))
    chosen = selected_experts(model, adapter, batch)
    expected = [(layer, e) for layer in sorted(chosen) for e in range(8) if e not in chosen[layer]]
    assert len(expected) >= 2 * len(chosen) and unreached_experts(stats) == expected
    with pytest.raises(QualityGuardError, match=r"calibrate on more or other text \(samples, calib\) or allow them with allow_unreached$") as failed:
        guard(model, copy.deepcopy(model), WINDOWS, stats=stats)
    named = ", ".join(f"{layer}:{e}" for layer, e in expected[:12])
    assert f"{len(expected)} expert(s) never received a calibration token" in str(failed.value) and f"(layer:expert {named}" in str(failed.value)
    assert "top-1" not in str(failed.value)  # top-1 itself passed: the output is the input
    allowed = guard(model, copy.deepcopy(model), WINDOWS, stats=stats, allow_unreached=True)
    assert allowed.passed and allowed.to_dict()["unreached_experts"] == [f"{layer}:{e}" for layer, e in expected]


def test_a_stage_that_removed_decoder_layers_fails_without_naming_one():
    model = tiny_model("mixtral").eval()
    shallower = tiny_model("mixtral", num_layers=2).eval()  # what a block drop leaves, with other weights
    with pytest.raises(QualityGuardError, match=r"no layer named \(the layers were not compared one to one\)") as failed:
        guard(model, shallower, WINDOWS, stage="drop", min_top1=1.0)
    assert failed.value.report.layer_errors is None and failed.value.report.fidelity.top1_agreement < 1.0


def test_bad_threshold_and_windows_are_refused():
    model = tiny_model("mixtral", num_layers=1)
    with pytest.raises(MoECompressError, match="--guard-min-top1 must be between 0 and 1; got 1.5"):
        guard(model, model, WINDOWS, min_top1=1.5)
    with pytest.raises(MoECompressError, match=r"at least one window of tokens \[n, seq_len\]; got a tensor of shape \(24,\)"):
        guard(model, model, WINDOWS[0])


def test_card_lines_and_the_summary_dict():
    report = GuardReport("quantize", FidelityResult(0.01234, 0.8125, 4096), 16, 256, 0.9, {0: 0.02, 1: 3.5, 2: 0.01, 3: 0.04},
                         ((1, 3), (4, 0)), allow_unreached=False)
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["passed"] is False and summary["worst_layers"] == [[1, 3.5], [3, 0.04], [0, 0.02]]
    assert summary["unreached_experts"] == ["1:3", "4:0"] and summary["layer_errors"]["1"] == 3.5
    assert guard_lines(summary) == [
        "Quality guard after quantize: FAILED. The stage's output against its input on 16 held-out calibration windows of 256 tokens "
        "(4,096 predictions), teacher-forced.",
        "",
        "| check | measured | threshold | result |",
        "|---|---:|---:|---|",
        "| top-1 agreement | 0.8125 | >= 0.9 | fail |",
        "| KL(input \\|\\| output), nats per token | 0.01234 | - | - |",
        "| experts calibration never reached (layer:expert) | 2: 1:3, 4:0 | 0 | fail |",
        "| worst decoder layers (own output error / its update) | 1: 3.5, 3: 0.04, 0: 0.02 | - | - |",
    ]
    assert summary["failure"] == (
        "quality guard failed after quantize: top-1 agreement 0.812 < 0.9 against the stage's input on 16 held-out windows "
        "(KL 0.0123 nats/token); worst layer 1 (its own output off by 3.5 of its update); if the stage may lose that much, "
        "lower the threshold with --guard-min-top1; and 2 expert(s) never received a calibration token, so the stage treated "
        "them without data (layer:expert 1:3, 4:0); calibrate on more or other text (samples, calib) or allow them with "
        "allow_unreached"
    )
