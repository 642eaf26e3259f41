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
`activation_heap` serves them from the heap for the duration of a forward, as glibc's own
threshold would have.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
_PINNED = 128 * 1024
_HEAP_MAX = 32 * 1024 * 1024  # glibc's largest dynamic threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_pinned = False


def _mallopt(threshold: int) -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 128 KiB for this process; whether it took effect."""
    global _pinned
    if not _pinned:
        _pinned = _mallopt(_PINNED)
    return _pinned


@contextmanager
def activation_heap() -> Iterator[None]:
    """Blocks up to 32 MiB come from the heap inside the block (where the threshold is pinned; else glibc does so anyway)."""
    if not _pinned:
        yield
        return
    _mallopt(_HEAP_MAX)
    try:
        yield
    finally:
        _mallopt(_PINNED)


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
