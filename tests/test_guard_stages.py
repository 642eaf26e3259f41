"""The quality guard after condense and finetune: printed, recorded in the summary and the card, exit 2 below the threshold;
after prune, as the run reads: in its batch size, streamed when it streams."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moe_compress.cli import app
from tiny_checkpoints import save_tiny_checkpoint, write_calibration


def _summary(directory) -> dict:
    return json.loads((directory / "moe_compress_summary.json").read_text())


@pytest.fixture(scope="module")
def condensed(tmp_path_factory):
    """A tiny DeepSeek-V2 checkpoint, its calibration text, and the `condense` command's run on it (guard passed)."""
    root = tmp_path_factory.mktemp("guarded")
    checkpoint = save_tiny_checkpoint(root / "tiny", "deepseek_v2")
    calib = write_calibration(root / "calib.jsonl", documents=60)
    args = ["condense", str(checkpoint), "--layers", "1", "--samples", "4", "--seq-len", "16", "--calib", str(calib)]
    result = CliRunner().invoke(app, [*args, "--out", str(root / "cd"), "--guard-min-top1", "0"])
    assert result.exit_code == 0, result.output
    return root, args, result.output


def test_condense_prints_and_records_the_guard(condensed):
    root, _, output = condensed
    guard = _summary(root / "cd")["guard"]
    assert guard["stage"] == "condense" and guard["passed"] and guard["min_top1"] == 0 and guard["seq_len"] == 16
    assert guard["windows"] == 32 and guard["tokens"] == 32 * 15
    assert 0 < guard["top1_agreement"] < 1  # the condensed layer changed some predictions
    assert (f"quality guard after condense: passed, top-1 agreement {guard['top1_agreement']:.3f} (>= 0), "
            f"KL {guard['kl']:.4f} nats/token against the input on 32 held-out windows") in output
    assert "Quality guard after condense: passed." in (root / "cd" / "README.md").read_text()


def test_condense_below_the_threshold_exits_2_and_marks_the_card(condensed, tmp_path):
    root, args, _ = condensed
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "cd"), "--guard-min-top1", "1"])
    assert result.exit_code == 2, result.output
    guard = _summary(tmp_path / "cd")["guard"]
    assert not guard["passed"] and guard["top1_agreement"] < 1
    assert "quality guard failed after condense: top-1 agreement " in result.output and "--guard-min-top1" in result.output
    assert "Quality guard after condense: FAILED." in (tmp_path / "cd" / "README.md").read_text()


def test_finetune_guards_on_its_evaluation_text_and_fails_below_the_threshold(condensed, tmp_path):
    root, _, _ = condensed
    args = ["finetune", str(root / "cd"), "--data", str(root / "calib.jsonl"), "--eval-data", str(root / "calib.jsonl"), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--lr", "0.05", "--device", "cpu"]
    passed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ft"), "--guard-min-top1", "0"])
    assert passed.exit_code == 0, passed.output
    guard = _summary(tmp_path / "ft")["guard"]
    assert guard["stage"] == "finetune" and guard["passed"] and guard["windows"] == 32 and guard["seq_len"] == 16
    assert _summary(tmp_path / "ft")["finetune"]["steps"] == 2  # the stage's own summary is kept
    assert f"quality guard after finetune: passed, top-1 agreement {guard['top1_agreement']:.3f}" in passed.output
    assert "Quality guard after finetune: passed." in (tmp_path / "ft" / "README.md").read_text()
    failed = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ft2"), "--guard-min-top1", "1"])
    assert failed.exit_code == 2 and "quality guard failed after finetune: top-1 agreement " in failed.output, failed.output
    assert not _summary(tmp_path / "ft2")["guard"]["passed"]
    skipped = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "ft3"), "--no-guard"])
    assert skipped.exit_code == 0 and "quality guard" not in skipped.output and "guard" not in _summary(tmp_path / "ft3")


def test_the_guard_reads_as_the_run_says_in_its_batch_size_and_streamed_when_it_streams(condensed, tmp_path, monkeypatch):
    """--batch-size bounds the memory of one forward and --streaming on that of the weights; the guard's comparison keeps to both."""
    import moe_compress.evaluate.guard as guard_module

    root, _, _ = condensed
    calls, compare = [], guard_module.compare
    monkeypatch.setattr(guard_module, "compare", lambda *a, **k: calls.append((a[3], a[4].streamed, a[5].streamed)) or compare(*a, **k))
    args = ["prune", str(root / "tiny"), "--ratio", "0.25", "--samples", "4", "--seq-len", "16", "--calib", str(root / "calib.jsonl"), "--no-cache"]
    for extra, out in ((["--batch-size", "3", "--streaming", "on"], "three"), ([], "default")):
        result = CliRunner().invoke(app, [*args, *extra, "--out", str(tmp_path / out), "--guard-min-top1", "0"])
        assert result.exit_code == 0, result.output
    assert calls == [(3, True, True), (8, False, False)]  # a tiny checkpoint fits in memory: auto loads it whole
    guard = _summary(tmp_path / "three")["guard"]
    assert guard["passed"] and guard["windows"] == 32 and guard["tokens"] == 32 * 15
