"""`single.run_single`: the one flow of the prune, drop and slim commands, callable from Python.

What must hold: the structure check runs on the opened model before the stage; the perplexities
before and after are the ones a separate measurement of the input and of the saved output gives;
without evaluation text nothing is measured; a measurement against the original sees the input
unchanged although an in-memory stage changes its model in place.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from moe_compress.data.batches import CalibrationSpec
from moe_compress.evaluate.compression import eval_sets, perplexities
from moe_compress.evaluate.protocol import EvalProtocol
from moe_compress.source.load import load_model
from moe_compress.loading import LoadSettings
from moe_compress.single import run_single
from moe_compress.slimming import slim
from moe_compress.stages.drop import drop
from tiny_checkpoints import save_tiny_checkpoint, write_calibration

PROTOCOL = EvalProtocol(2, 16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return save_tiny_checkpoint(root / "tiny"), write_calibration(root / "calib.jsonl")


def _measured(directory, calib) -> dict[str, float]:
    model, tokenizer = load_model(directory)
    return perplexities(model, eval_sets(PROTOCOL, str(calib), tokenizer, model.config))


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_slim_is_checked_first_and_measured_before_and_after(tiny, tmp_path, streaming):
    checkpoint, calib = tiny
    seen = []
    stage = partial(slim, method="magnitude", sparsity=0.5, out=tmp_path / "out")
    run = run_single(stage, str(checkpoint), tmp_path / "out", False, LoadSettings(streaming=streaming),
                     check=lambda structure: seen.append((structure.experts, structure.top_k)), eval_ppl=str(calib), protocol=PROTOCOL)
    assert seen == [({0: 8, 1: 8, 2: 8}, 2)]  # the tiny mixtral: 3 MoE layers of 8 experts, top-2
    assert run.result.summary["streamed"] is (streaming == "on")
    assert run.before == _measured(checkpoint, calib)
    assert run.after == _measured(tmp_path / "out", calib)
    assert run.after[str(calib)] != run.before[str(calib)]


def test_without_evaluation_text_nothing_is_measured(tiny, tmp_path):
    checkpoint, calib = tiny
    stage = partial(drop, n=1, calib=CalibrationSpec(str(calib), samples=2, seq_len=16), out=tmp_path / "out")
    run = run_single(stage, str(checkpoint), tmp_path / "out", False, LoadSettings())
    assert (run.before, run.after) == ({}, {})
    assert run.result.summary["params_after"] < run.result.summary["params_before"]


def test_the_original_is_measured_unchanged_after_an_in_memory_stage(tiny, tmp_path):
    checkpoint, calib = tiny
    seen = {}

    def against_original(result, original, original_weights, windows, after, device):
        seen.update(original=original, original_weights=original_weights, changed=result.model, after=after)

    stage = partial(slim, method="magnitude", sparsity=0.5, out=tmp_path / "out")
    run = run_single(stage, str(checkpoint), tmp_path / "out", False, LoadSettings(streaming="off"), eval_ppl=str(calib),
                     protocol=PROTOCOL, against_original=against_original)
    assert seen["original"] is not seen["changed"] and seen["original_weights"] is None and seen["after"] == run.after
    expected, _ = load_model(checkpoint)
    for (name, kept), (_, fresh) in zip(seen["original"].state_dict().items(), expected.state_dict().items()):
        assert torch.equal(kept, fresh), name
