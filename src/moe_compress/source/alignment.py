"""Every weight on a 64-byte boundary, however it was read: computed results must not depend on where bytes sat.

CPU BLAS kernels may round differently depending on the address of their operands. Measured
with torch 2.13's MKL on an AMD EPYC (AVX-512): a single-row product `x @ W.T` -- what an expert
computes for the one token routed to it -- gives a result one ulp apart when `W` starts at
8 mod 16 bytes instead of 16 mod 16, while multi-row products do not care. Where a checkpoint's
tensors land depends on how they were read: `from_pretrained` maps the safetensors file, so a
tensor sits at its file offset (any multiple of 8); the streamed reader (`pread`) places each in
a fresh 16-aligned buffer. The same checkpoint then computed different statistics in memory and
streamed. Both residencies therefore copy any CPU tensor that is not 64-byte aligned (torch's
CPU allocator aligns to 64, the widest vector width) into one that is, so the kernels see the
same alignment in both.
"""

from __future__ import annotations

import torch
from torch import nn

#: bytes; torch's CPU allocator returns blocks aligned to this (c10's gAlignment)
ALIGNMENT = 64


def is_aligned(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s data starts on an `ALIGNMENT` boundary (tensors off the CPU, and empty ones, always do)."""
    return tensor.device.type != "cpu" or tensor.numel() == 0 or tensor.data_ptr() % ALIGNMENT == 0


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself if aligned, else a copy (same values, same strides) in freshly allocated, aligned memory."""
    if is_aligned(tensor):
        return tensor
    copy = torch.empty_like(tensor)
    copy.copy_(tensor)
    return copy


@torch.no_grad()
def align_weights(module: nn.Module) -> None:
    """Realign `module`'s parameters and buffers in place (a Parameter keeps its identity, so tied weights stay tied)."""
    for parameter in module.parameters():
        if not is_aligned(parameter):
            parameter.data = aligned(parameter.data)
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and not is_aligned(buffer):
                owner._buffers[name] = aligned(buffer)
