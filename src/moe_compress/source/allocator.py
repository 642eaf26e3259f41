"""Freed tensor memory goes back to the operating system at once while streaming.

glibc serves blocks above its mmap threshold (128 KiB) with their own mappings and unmaps them
when freed -- but each time such a block is freed it raises the threshold to that block's size
(up to 32 MiB). After the first few layers, every tensor of a few MiB (one expert's weights, its
float32 copy while quantising) comes from the heap instead, and the heap keeps the pages of
freed blocks. A streamed run frees a whole layer per step, so its resident memory grew by about
a layer's worth of such blocks (quantize on a 1.4 GiB Qwen3-30B-shaped layer: 4.25 GiB peak,
2.89 GiB with the threshold pinned). Pinning the threshold keeps each big block a mapping of
its own. Elsewhere than glibc this does nothing.

A forward pass is the opposite case: it allocates and frees the same activation-sized blocks
(a few MiB each) over and over, and as fresh mappings each of them faults its pages in anew
(1.1 s of system time in 2.6 s of a streamed layer walk's forward, bench/results/speed.md).
`activation_heap` serves them from the heap for the duration of a forward, and keeps what
the forward frees there for the next batch: blocks up to 64 MiB, and up to 128 MiB of free heap
top (the trim threshold, which glibc's own adjustment keeps at twice the mmap threshold). Both
matter, measured on the 2-layer Qwen3-30B-shaped walk of bench/speed.py (4 x 256 tokens a batch):
an explicit mmap threshold freezes the trim threshold, and at 128 KiB the heap gave every freed
activation block back at once to fault it in again for the next batch (230 k of the forward's
570 k page faults); and top-8 routing of 1024 tokens makes [8192, 2048] bf16 blocks, 32 MiB plus
malloc's header, just over glibc's largest dynamic threshold (32 MiB), so each was a mapping of
its own, faulted in anew per batch (196 k page faults). Together 0.6 s of system time in a walk
of 8 CPU s. Peak memory is the forward's working set either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
_PINNED = 128 * 1024  # glibc's default mmap and trim thresholds (DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD)
_HEAP_BLOCKS = 64 * 1024 * 1024  # inside `activation_heap`: twice glibc's largest dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX)
_pinned = False


def _set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds; whether both took."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap and trim thresholds at their 128 KiB defaults for this process; whether it took effect.

    The trim threshold is set too because glibc's dynamic adjustment may have raised it before
    (to twice the last freed mapping): `activation_heap` then knows what to restore."""
    global _pinned
    if not _pinned:
        _pinned = _set_thresholds(_PINNED, _PINNED)
    return _pinned


@contextmanager
def activation_heap() -> Iterator[None]:
    """Blocks up to 64 MiB come from the heap inside the block, and up to 128 MiB of freed ones stay there for
    the next batch (where the thresholds are pinned; else glibc keeps blocks up to 32 MiB there anyway). When the
    block ends (a layer's forward is done) the heap's free pages go back (`trim_heap`): kept past it, below blocks
    still in use where glibc's own trimming of the top does not reach, they sat on the next layer's weights (the
    streamed fit of bench/results/fit_scale.md, peak RSS 4.89 GiB and killed by its 4.77 GiB cgroup; 4.63 with this)."""
    if not _pinned:
        yield
        return
    _set_thresholds(_HEAP_BLOCKS, 2 * _HEAP_BLOCKS)
    try:
        yield
    finally:
        _set_thresholds(_PINNED, _PINNED)
        trim_heap()  # what the block kept for its next batch goes back: outside it, a layer's weights need the room


def trim_heap() -> bool:
    """Give the heap's free pages back to the operating system (glibc's `malloc_trim`); whether any were.

    What a forward frees inside `activation_heap` stays in the heap, and a block still in use above
    it keeps the heap from shrinking: after a streamed walk over 1 GB layers that was 1.6 GiB of
    freed memory still resident (fit: calibration, then the candidates' walk). Elsewhere than glibc
    this does nothing."""
    name = ctypes.util.find_library("c")
    try:
        return bool(name and ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False
