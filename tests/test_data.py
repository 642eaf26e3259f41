"""Calibration text sources and deterministic token batches."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe_compress import CalibrationSpec, MoECompressError
from moe_compress.data import calibration_batches, load_texts, windows
from tiny_checkpoints import tiny_tokenizer, write_calibration


def test_text_formats(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "third"}) + "\n\n" + json.dumps({"body": "fourth"}) + "\n")
    pq.write_table(pa.table({"body": ["fifth", "", "sixth"]}), tmp_path / "c.parquet")
    assert load_texts(tmp_path / "a.txt") == ["first doc", "second doc"]
    assert load_texts(tmp_path / "b.jsonl", text_field="body") == ["third", "fourth"]
    assert load_texts(tmp_path / "c.parquet", text_field="body") == ["fifth", "sixth"]
    (tmp_path / "b.jsonl").unlink()
    assert load_texts(tmp_path, text_field="body") == ["first doc", "second doc", "fifth", "sixth"]


def test_source_errors(tmp_path):
    with pytest.raises(MoECompressError, match="not found"):
        load_texts(tmp_path / "nothing.jsonl")
    (tmp_path / "x.jsonl").write_text(json.dumps({"other": "t"}) + "\n")
    with pytest.raises(MoECompressError, match="no field 'text'"):
        load_texts(tmp_path / "x.jsonl")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(MoECompressError, match="contains no text"):
        load_texts(tmp_path / "blank.txt")
    with pytest.raises(MoECompressError, match="offline"):
        load_texts("hf:wikitext:wikitext-2-raw-v1@train")


def test_batches_are_full_windows_and_deterministic(tmp_path):
    tokenizer = tiny_tokenizer()
    source = write_calibration(tmp_path / "c.jsonl", documents=60)
    spec = CalibrationSpec(str(source), samples=10, seq_len=16, seed=3, batch_size=4)
    first = calibration_batches(tokenizer, spec)
    assert [tuple(b.shape) for b in first] == [(4, 16), (4, 16), (2, 16)]
    assert all(torch.equal(a, b) for a, b in zip(first, calibration_batches(tokenizer, spec)))
    other = calibration_batches(tokenizer, CalibrationSpec(str(source), samples=10, seq_len=16, seed=4, batch_size=4))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_windows_do_not_overlap():
    stream = torch.arange(10)
    assert windows(stream, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_invalid_spec():
    with pytest.raises(MoECompressError, match="samples must be a positive integer"):
        calibration_batches(tiny_tokenizer(), CalibrationSpec("x", samples=0))
