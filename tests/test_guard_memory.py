"""What the streamed guard holds: one head for two models whose heads are stored alike, no buffer left in a
pool once a walk's last read is done, and KL sums from fewer temporaries that are kl_div's floats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from helpers import token_batches
from moe_compress import compress
from moe_compress.arch.registry import get_adapter
from moe_compress.evaluate.fidelity import compare, kl_sum
from moe_compress.evaluate.streamed import BatchLogits
from moe_compress.sink.export import streamed_groups, walk_groups
from moe_compress.source.checkpoint import Checkpoint
from moe_compress.source.load import load_model, load_streamed
from tiny_models import tiny_model

SHARED = ("lm_head.weight", "model.norm.weight")


@pytest.fixture
def pair(tmp_path):
    """A tiny Qwen3-MoE checkpoint and its REAP-pruned copy (half the experts, head and final norm untouched)."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "original")
    compress(tiny_model("qwen3_moe"), method="reap", ratio=0.5, calib=token_batches(), out=tmp_path / "pruned", cache_dir=False)
    return tmp_path / "pruned", tmp_path / "original"


def _walked(pruned, original, windows):
    mine, theirs = load_streamed(pruned)[0], load_streamed(original)[0]
    batches = list(windows.split(2))
    return mine, theirs, BatchLogits.walk(mine.model, batches, mine), BatchLogits.walk(theirs.model, batches, theirs)


def _change_head(pruned) -> None:
    """The pruned checkpoint's head made different from the original's (its stored bytes, not its shape)."""
    shard = next(pruned.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2
    save_file(tensors, shard, metadata={"format": "pt"})


def test_an_untouched_head_is_held_once_and_freed_with_its_pools(pair):
    windows = torch.cat(token_batches(count=2, batch=2, seq_len=10))
    mine, theirs, mine_batches, their_batches = _walked(*pair, windows)
    with their_batches.head() as their_logits, mine_batches.head(like=their_batches) as my_logits:
        for name in SHARED:  # the same memory, not an equal copy
            assert mine.model.get_parameter(name).data_ptr() == theirs.model.get_parameter(name).data_ptr()
        logits = my_logits(0), their_logits(0)
    assert not torch.equal(*logits)  # the layers differ: the logits are still each model's own
    for weights in (mine, theirs):
        assert all(weights.model.get_parameter(name).device.type == "meta" for name in SHARED)
        assert weights._buffers._kept == []  # the heads went back, not to a pool that nothing would take them from


def test_a_changed_head_is_read_from_its_own_checkpoint_and_the_numbers_hold(pair):
    pruned, original = pair
    _change_head(pruned)
    windows = torch.cat(token_batches(count=2, batch=2, seq_len=10))
    mine, theirs, mine_batches, their_batches = _walked(pruned, original, windows)
    with their_batches.head(), mine_batches.head(like=their_batches):
        assert mine.model.lm_head.weight.data_ptr() != theirs.model.lm_head.weight.data_ptr()
        assert torch.equal(mine.model.lm_head.weight, theirs.model.lm_head.weight * 2)
        assert mine.model.model.norm.weight.data_ptr() == theirs.model.model.norm.weight.data_ptr()  # still stored alike
    in_memory = compare(load_model(pruned)[0], load_model(original)[0], windows, batch_size=2)
    mine, theirs = load_streamed(pruned)[0], load_streamed(original)[0]
    streamed = compare(mine.model, theirs.model, windows, batch_size=2, weights=mine, original_weights=theirs)
    assert streamed[0].top1_agreement == in_memory[0].top1_agreement and streamed[0].kl == pytest.approx(in_memory[0].kl, rel=1e-5)


def test_sharing_the_head_changes_no_float(pair, monkeypatch):
    windows = torch.cat(token_batches(count=3, batch=2, seq_len=10))
    results = []
    for share in (True, False):
        if not share:
            monkeypatch.setattr("moe_compress.evaluate.streamed.identical_names", lambda *args: [])
        mine, theirs = load_streamed(pair[0])[0], load_streamed(pair[1])[0]
        results.append(compare(mine.model, theirs.model, windows, batch_size=2, weights=mine, original_weights=theirs))
    assert results[0] == results[1]


def test_same_bytes_compares_every_chunk(pair, tmp_path):
    pruned, original = pair
    assert Checkpoint(pruned).same_bytes("lm_head.weight", Checkpoint(original), chunk=1000)
    shard = next(pruned.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["lm_head.weight"].view(-1)[-1] += 1  # the last chunk only
    save_file(tensors, shard, metadata={"format": "pt"})
    assert not Checkpoint(pruned).same_bytes("lm_head.weight", Checkpoint(original), chunk=1000)
    assert Checkpoint(pruned).same_bytes("model.norm.weight", Checkpoint(original), chunk=1000)
    assert not Checkpoint(pruned).same_bytes("model.layers.0.mlp.gate.weight", Checkpoint(original))  # pruned: another shape


@pytest.mark.parametrize("writer", ["two-pass", "during a walk"])
def test_the_streamed_writer_leaves_no_buffer_in_its_pool(pair, writer):
    """Both writers (`streamed_groups`; `walk_groups`, which slimming and a fused prune write through) read the head
    last: what the pool kept of it would sit beside the guard's heads."""
    weights = load_streamed(pair[1])[0]
    adapter = get_adapter(weights.model)
    groups = streamed_groups(weights, adapter, None) if writer == "two-pass" else walk_groups(weights, adapter, [])
    written = [name for group, _ in groups for name in group]  # every group, as the writer takes them
    assert "lm_head.weight" in written and weights._buffers._kept == []


@pytest.mark.parametrize("shape", [(1, 255, 1000), (2, 9, 64), (3, 1, 7)])
@pytest.mark.parametrize("consume", [False, True])
def test_kl_sum_is_kl_div_bit_for_bit(shape, consume):
    torch.manual_seed(0)
    mine, reference = (F.log_softmax(torch.randn(shape, dtype=torch.bfloat16) * 4, -1, dtype=torch.float32) for _ in range(2))
    expected = float(F.kl_div(mine, reference, log_target=True, reduction="sum"))
    assert kl_sum(mine, reference.clone() if consume else reference, consume) == expected
