"""`source.allocator`: inside `activation_heap` a freed activation-sized block stays in the heap for the next batch."""

import resource

import pytest
import torch

from moe_compress.source.allocator import activation_heap, pin_mmap_threshold

_MIB = 1 << 20


def _faults_filling(mib: int) -> int:
    """Minor page faults of this thread while a fresh tensor of `mib` MiB is allocated, filled and freed."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    torch.empty(mib * _MIB // 4).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="per-thread page faults are Linux's")
def test_a_freed_block_is_reused_inside_the_heap_and_given_back_outside():
    """40 MiB: over glibc's largest dynamic mmap threshold (32 MiB), under the heap's 64 MiB. The second block is
    smaller so that it fits the first one's place whatever posix_memalign cut off around it."""
    if not pin_mmap_threshold():
        pytest.skip("not glibc: the thresholds cannot be set")
    with activation_heap():
        _faults_filling(40)
        reused = _faults_filling(36)  # the first block's pages, still resident in the heap
    _faults_filling(40)
    fresh = _faults_filling(36)  # pinned: a mapping of its own, unmapped when freed, faulted in anew
    assert reused < 64  # a few pages of bookkeeping at most, against 9216 for the block
    assert fresh >= 36 * _MIB // 4096 // 2  # at least one fault per two pages (the kernel may fault in 8 KiB folios)


def test_what_the_heap_kept_is_given_back_when_the_block_ends(monkeypatch):
    """The blocks a layer's forward kept for its next batch are free memory once the forward is done; left resident
    (below blocks still in use, where glibc's own trimming of the heap's top does not reach), they sat on top of the next
    layer's weights and a streamed fit was killed by its cgroup (bench/results/fit_scale.md). The block ends by giving
    the heap's free pages back, after restoring the thresholds."""
    from moe_compress.source import allocator

    if not pin_mmap_threshold():
        pytest.skip("not glibc: the thresholds cannot be set")
    calls = []
    monkeypatch.setattr(allocator, "trim_heap", lambda: calls.append("trim") or True)
    monkeypatch.setattr(allocator, "_set_thresholds", lambda mmap, trim: calls.append((mmap, trim)) or True)
    with activation_heap():
        calls.append("forward")
    assert calls == [(64 * _MIB, 128 * _MIB), "forward", (128 * 1024, 128 * 1024), "trim"]


def test_a_skeleton_leaves_the_threshold_and_a_streamed_load_pins_it(tmp_path, monkeypatch):
    """Only a run that streams weights pins glibc's mmap threshold: fit sizes an in-memory run from a skeleton, and pinned
    there, every later block over 128 KiB of the process (its measurement, a prune after it) was a mapping faulted in anew."""
    from moe_compress.preflight import skeleton
    from moe_compress.source import allocator
    from moe_compress.source.load import load_streamed
    from tiny_checkpoints import save_tiny_checkpoint

    source = save_tiny_checkpoint(tmp_path / "source", "mixtral")
    pinned = []
    monkeypatch.setattr(allocator, "pin_mmap_threshold", lambda: pinned.append(True) or True)
    skeleton(str(source))
    assert pinned == []
    load_streamed(str(source))
    assert pinned == [True]
