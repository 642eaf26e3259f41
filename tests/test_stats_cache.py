"""The statistics cache cannot answer for another model, never half-answers, and never costs the run."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors import SafetensorError

from fs_faults import tmpfs
from helpers import token_batches
from moe_compress import get_adapter
from moe_compress.engine.statistics import collect_statistics
from moe_compress.walk import cache as cache_module
from moe_compress.walk.cache import StatsCache
from tiny_models import tiny_model

NAMES = ("reap_sum", "selected")


def _entry(cache_dir):
    """(key, everything the one entry in `cache_dir` holds): the key is the file name's first part."""
    entry = next(cache_dir.glob("*.safetensors"))
    key = entry.name.split(".")[0]
    return key, StatsCache(cache_dir).load(key)


def _collect(model, cache_dir, batches=None):
    return collect_statistics(model, batches or token_batches(count=1), NAMES, cache_dir)


def test_a_changed_config_misses(tmp_path):
    model = tiny_model("mixtral")
    assert not _collect(model, tmp_path)[1] and _collect(model, tmp_path)[1]
    model.config.num_experts_per_tok = 3  # routing changed, weights untouched
    assert not _collect(model, tmp_path)[1]


def test_a_changed_weight_the_old_sampling_skipped_misses(tmp_path):
    model = tiny_model("mixtral")
    experts = get_adapter(model).experts(get_adapter(model).moe_block(model.model.layers[0]))
    assert experts.gate_up_proj.numel() > 4096, "large enough that a strided sample skipped odd positions"
    first, from_cache = _collect(model, tmp_path)
    with torch.no_grad():
        experts.gate_up_proj.view(-1)[1] += 1.0
    second, from_cache = _collect(model, tmp_path)
    assert not from_cache
    assert not torch.equal(first[0]["reap_sum"], second[0]["reap_sum"])


def test_an_entry_missing_a_layer_is_recomputed_not_half_used(tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    full, _ = _collect(model, tmp_path)
    key, held = _entry(tmp_path)
    StatsCache(tmp_path).save(key, {layer: named for layer, named in held.items() if layer != 1})  # a consistent, partial entry
    stats, from_cache = _collect(model, tmp_path)
    assert not from_cache and sorted(stats) == [0, 1, 2]
    assert all(torch.equal(stats[layer][name], full[layer][name]) for layer in full for name in full[layer])


def test_a_poisoned_entry_is_recomputed(tmp_path):
    model = tiny_model("mixtral")
    _collect(model, tmp_path)
    key, held = _entry(tmp_path)
    StatsCache(tmp_path).save(key, {layer: {n: torch.full_like(v, float("nan")) for n, v in named.items()} for layer, named in held.items()})
    stats, from_cache = _collect(model, tmp_path)
    assert not from_cache and torch.isfinite(stats[0]["reap_sum"]).all()


def test_an_entry_altered_behind_intact_metadata_is_recomputed(tmp_path, capsys):
    """One low mantissa bit of a stored statistic flipped (still finite, same key and layout): not trusted."""
    model = tiny_model("mixtral")
    full, _ = _collect(model, tmp_path)
    entry = next(tmp_path.glob("*.safetensors"))
    data = bytearray(entry.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8 : 8 + header_size])["0/reap_sum"]["data_offsets"]
    data[8 + header_size + start] ^= 1
    entry.write_bytes(bytes(data))
    capsys.readouterr()
    stats, from_cache = _collect(model, tmp_path)
    assert not from_cache
    assert torch.equal(stats[0]["reap_sum"], full[0]["reap_sum"])
    assert f"warning: statistics cache entry {entry} holds data (0/reap_sum) that does not match the digest it records" in capsys.readouterr().err


def test_writers_use_unique_temporary_names(tmp_path, monkeypatch):
    written = []
    real = cache_module.save_file
    monkeypatch.setattr(cache_module, "save_file", lambda tensors, path, metadata=None: (written.append(path), real(tensors, path, metadata))[1])
    stats = {0: {"tokens": torch.ones(8, dtype=torch.float64)}}
    StatsCache(tmp_path).save("k", stats)
    StatsCache(tmp_path).save("k", stats)
    pid = __import__("os").getpid()
    assert len(set(written)) == 2 and all(re.search(rf"/\.k\.[0-9a-f]+\.safetensors\.{pid}@", p) for p in written), written
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.iterdir()).name] and next(tmp_path.iterdir()).name.startswith("k.")


@pytest.mark.parametrize("fault", ["a-file", "read-only", "full"])
def test_an_unusable_cache_dir_is_a_warning(fault, tmp_path, monkeypatch, capsys):
    cache_dir = tmp_path / "cache"
    if fault == "a-file":
        cache_dir.write_text("not a directory")
    elif fault == "read-only":
        def refuse(*args, **kwargs):
            raise OSError(30, "Read-only file system")
        monkeypatch.setattr(cache_module, "save_file", refuse)
    else:
        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(cache_module, "save_file", full)
    stats, from_cache = _collect(tiny_model("mixtral"), cache_dir)
    assert not from_cache and sorted(stats) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "warning: statistics cache" in err and "continuing without caching" in err


def test_a_full_tmpfs_cache_dir_is_a_warning(tmp_path, capsys):
    with tmpfs(tmp_path / "full", size="4k") as cache_dir:  # one page; the moments need three
        stats, from_cache = collect_statistics(tiny_model("mixtral"), token_batches(count=1), ("output_moments",), cache_dir)
        assert not from_cache and sorted(stats) == [0, 1, 2]
        assert "No space left on device" in capsys.readouterr().err
        assert [p.name for p in cache_dir.iterdir()] == [], "no partial file is left behind"


def test_fingerprints_see_every_byte_and_every_shard(tmp_path):
    from moe_compress.walk.cache import checkpoint_fingerprint, content_fingerprint

    model = tiny_model("mixtral")
    before = content_fingerprint(model)
    with torch.no_grad():
        model.lm_head.weight.view(-1)[-1] += 1e-3
    assert content_fingerprint(model) != before
    model.save_pretrained(tmp_path / "a")
    copy = shutil.copytree(tmp_path / "a", tmp_path / "b")  # copy2 keeps mtimes
    assert checkpoint_fingerprint(tmp_path / "a") == checkpoint_fingerprint(copy)
    shard = next(copy.glob("*.safetensors"))
    stat = shard.stat()
    __import__("os").utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert checkpoint_fingerprint(copy) != checkpoint_fingerprint(tmp_path / "a")
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    header = json.loads(shard.read_bytes()[8 : 8 + header_len])
    assert header, "the header names every tensor: it is what the fingerprint hashes"
