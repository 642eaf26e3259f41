"""Layer-sized buffers handed from one streamed layer to the next instead of freed and allocated anew.

A fused expert tensor is hundreds of MB: glibc serves it with a mapping of its own, unmaps
it when it is freed, and the next layer's tensor of the same shape faults every page in
again -- zeroed by the kernel, then overwritten by the read. On the test VM that first touch
cost 0.5 s of system time per 1.2 GB layer, three times the read itself
(bench/results/speed.md). Consecutive decoder layers have tensors of the same shapes, so the
buffers a layer releases are kept and filled with the next layer's bytes.

A kept buffer is reused only while nothing but the pool refers to its memory (a stage may
keep a view of a weight after its layer was released: it must never see it overwritten),
and whatever the next read does not take is freed at once: the pool never holds more than
what one release gave back. Reused buffers keep their address, hence their 64-byte
alignment (`source.alignment`).
"""

from __future__ import annotations

import torch


def _storage_users(tensor: torch.Tensor) -> int:
    """How many tensors share `tensor`'s memory (plus the temporary this call makes)."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


_ALONE = _storage_users(torch.empty(1)) if hasattr(torch._C, "_storage_Use_Count") else None


class BufferPool:
    """Released CPU tensors, kept for the next request of the same shape and dtype."""

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] = []

    def give(self, tensor: torch.Tensor) -> None:
        """Keep `tensor`'s memory for reuse (only a CPU tensor that owns its whole storage)."""
        data = tensor.detach()
        if (
            _ALONE is not None
            and data.device.type == "cpu"
            and data.is_contiguous()
            and data.storage_offset() == 0
            and data.untyped_storage().nbytes() == data.nbytes
        ):
            self._kept.append(data)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of `shape` and `dtype`, uninitialised: a kept one nobody else refers to, else a new one."""
        for index, kept in enumerate(self._kept):
            if tuple(kept.shape) == shape and kept.dtype == dtype and _storage_users(kept) == _ALONE:
                return self._kept.pop(index)
        return torch.empty(shape, dtype=dtype)

    def clear(self) -> None:
        """Free what was not taken."""
        self._kept.clear()
