"""Asking the kernel for the next decoder layer's bytes while this one computes, so that disk time
hides under compute.

A streamed walk reads layer i+1's tensors only when it reaches it; from a cold page cache that
read waits on the disk while the CPU idles. As soon as layer i is in place, `read_ahead` tells
the kernel which byte ranges of which shards layer i+1 will read (`posix_fadvise(WILLNEED)`,
from a background thread so that issuing the requests never holds up the walk); the kernel
reads them into the page cache while layer i computes, and the walk's own reads of layer i+1
then copy from memory. Nothing else changes -- the same reads into the same pooled buffers,
the same first-read checks, in the same order -- so the bytes are the same, and a walk still
holds one layer's weights (the page cache it fills is the kernel's to reclaim). One layer
ahead at most: the walk asks for layer i+1 only while layer i is loaded.

An earlier version read layer i+1 into buffers of its own on the thread. That needs a second
set of layer buffers, whose first touch cost more system time than the overlap saved wherever
the checkpoint was in the page cache already (bench/results/speed.md).
"""

from __future__ import annotations

import os
from pathlib import Path


def merged(spans: list[tuple[Path, int, int]]) -> dict[Path, list[tuple[int, int]]]:
    """(shard, offset, bytes) spans as (offset, bytes) ranges per shard, adjacent or overlapping ones joined."""
    ranges: dict[Path, list[tuple[int, int]]] = {}
    for shard, start, size in sorted(spans):
        held = ranges.setdefault(shard, [])
        if held and start <= held[-1][0] + held[-1][1]:
            held[-1] = (held[-1][0], max(held[-1][0] + held[-1][1], start + size) - held[-1][0])
        else:
            held.append((start, size))
    return ranges


def read_ahead(spans: list[tuple[Path, int, int]]) -> None:
    """Ask the kernel to read these byte ranges into the page cache (advice: failures change nothing but speed)."""
    for shard, ranges in merged(spans).items():
        descriptor = os.open(shard, os.O_RDONLY)
        try:
            for start, size in ranges:
                os.posix_fadvise(descriptor, start, size, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(descriptor)
