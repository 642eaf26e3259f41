"""Freed tensor memory goes back to the operating system at once while streaming.

glibc serves blocks above its mmap threshold (128 KiB) with their own mappings and unmaps them
when freed -- but each time such a block is freed it raises the threshold to that block's size
(up to 32 MiB). After the first few layers, every tensor of a few MiB (one expert's weights, its
float32 copy while quantising) comes from the heap instead, and the heap keeps the pages of
freed blocks. A streamed run frees a whole layer per step, so its resident memory grew by about
a layer's worth of such blocks (quantize on a 1.4 GiB Qwen3-30B-shaped layer: 4.25 GiB peak,
2.89 GiB with the threshold pinned). Pinning the threshold keeps each big block a mapping of
its own. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
_pinned = False


def pin_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes for this process; whether it took effect."""
    global _pinned
    if _pinned:
        return True
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    _pinned = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    return _pinned
