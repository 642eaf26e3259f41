"""Calibration reads only as much text as the requested windows need (see data/batches.py)."""

from __future__ import annotations

import json

import pytest
import torch

from moe_compress import MoECompressError
from moe_compress.data import CalibrationSpec, calibration_batches, load_texts, read_windows, token_stream, windows
from moe_compress.data import batches as batches_module
from tiny_checkpoints import SENTENCES, tiny_tokenizer, write_calibration


class CountingTokenizer:
    """The tiny tokenizer, counting the characters it is asked to tokenise."""

    def __init__(self):
        self.inner = tiny_tokenizer()
        self.eos_token_id = self.inner.eos_token_id
        self.chars = 0

    def __call__(self, texts, **kwargs):
        self.chars += sum(len(t) for t in texts)
        return self.inner(texts, **kwargs)


@pytest.fixture(scope="module")
def huge_line(tmp_path_factory):
    """A 3 MB file that is one single line (one document), as .txt and as .jsonl."""
    root = tmp_path_factory.mktemp("huge")
    text = " ".join(SENTENCES) + " "
    (root / "one-line.txt").write_text(text * (3_000_000 // len(text)))
    (root / "one-line.jsonl").write_text(json.dumps({"text": text * (3_000_000 // len(text))}) + "\n")
    return root


@pytest.mark.parametrize("name", ["one-line.txt", "one-line.jsonl"])
def test_a_huge_single_document_is_not_tokenised_whole(name, huge_line, monkeypatch):
    monkeypatch.setattr(batches_module, "MIN_CHARS", 1 << 16)  # the floor, scaled down to keep the test fast
    tokenizer = CountingTokenizer()
    spec = CalibrationSpec(str(huge_line / name), samples=8, seq_len=32, batch_size=4)
    batches = calibration_batches(tokenizer, spec)
    assert [b.shape for b in batches] == [torch.Size([4, 32])] * 2
    cap = max(1 << 16, batches_module.CHARS_PER_TOKEN * spec.target_tokens)
    assert tokenizer.chars <= cap, f"tokenised {tokenizer.chars} characters of a 3 MB document"


def test_a_small_source_gives_the_same_windows_as_tokenising_everything(tmp_path):
    """Below the 1 MiB floor everything is read, so results equal the earlier whole-source cut."""
    source = write_calibration(tmp_path / "calib.jsonl", documents=60)
    tokenizer = tiny_tokenizer()
    spec = CalibrationSpec(str(source), samples=10, seq_len=16, seed=3, batch_size=4)
    everything = windows(token_stream(tokenizer, load_texts(source)), 16)
    expected = everything[torch.randperm(len(everything), generator=torch.Generator().manual_seed(3))[:10]]
    assert torch.equal(torch.cat(calibration_batches(tokenizer, spec)), expected)


def test_evaluation_windows_are_the_first_windows_read_no_further(tmp_path):
    """Documents are not cut for evaluation (that would change their tokens): reading stops between them."""
    source = write_calibration(tmp_path / "eval.jsonl", documents=2000)
    tokenizer = CountingTokenizer()
    first = read_windows(tokenizer, str(source), 32, max_windows=5, split="test")
    everything = windows(token_stream(tiny_tokenizer(), load_texts(source)), 32)
    assert torch.equal(first, everything[:5])
    assert tokenizer.chars < source.stat().st_size / 10


def test_more_samples_than_the_source_holds_is_an_error(tmp_path):
    source = write_calibration(tmp_path / "calib.jsonl", documents=5)
    with pytest.raises(MoECompressError, match=r"fewer than the 1000000000 requested \(samples\)\. Give more text, or lower samples or seq_len\."):
        calibration_batches(tiny_tokenizer(), CalibrationSpec(str(source), samples=1_000_000_000, seq_len=16))
