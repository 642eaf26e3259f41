"""Refuse NaN and Inf wherever numbers enter a compression run.

A single NaN in a weight, a statistic or an option spreads silently: scores become NaN,
every comparison is False, and the run "succeeds" with an arbitrary plan and a broken
checkpoint. Each check names what is not finite (the tensor and its layer, the statistic, the
option), so the user can find it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .errors import MoECompressError, param


_CHUNK = 1 << 24
_LONG_ROW = 1 << 16


def _bad_count(tensor: torch.Tensor) -> int:
    """How many values of `tensor` are NaN or infinite (0 for integer and meta tensors).

    Checked in chunks of 16 M values (a whole-tensor mask of a 0.8 GB expert tensor would
    cost half as much again), each first by its sum: a sum is finite only if every value is,
    so the exact count runs only for a chunk that holds a NaN or Inf (or whose float32 sum
    overflows). Streaming checks every weight it reads; the mask for every chunk cost as much
    as reading the layer.
    """
    if tensor.is_meta or not (tensor.is_floating_point() or tensor.is_complex()):
        return 0
    flat = tensor.detach().reshape(-1)
    return sum(
        int((~torch.isfinite(chunk)).sum()) for chunk in flat.split(_CHUNK) if not bool(torch.isfinite(chunk.sum(dtype=_sum_dtype(chunk))))
    )


def _sum_dtype(tensor: torch.Tensor) -> torch.dtype:
    return tensor.dtype if tensor.is_complex() or tensor.dtype == torch.float64 else torch.float32


#: The largest |value| a tensor read from a checkpoint may hold. Trained weights stay far below it:
#: the bundled reference models peak at 1.7 (a final norm), the 65 tiny family models of the tests
#: at 1.15, and the outlier weights and norms of released LLMs are reported in the hundreds at
#: most. Bytes read under a lying header exceed it (F32 bits read as I32 are ~1e9, BF16 bits as
#: I16 ~1.6e4), and so does a vector written broken (1e38).
READ_BOUND = 1e4


def matrix_peaks(tensor: torch.Tensor) -> list[float] | None:
    """Max |value| of each matrix of a floating tensor -- one per leading index of a stack of
    matrices (fused experts), else one for the whole tensor -- NaN where one holds a NaN.

    One pass, nothing copied: `aminmax` (a NaN mask or `abs()` would cost a tensor-sized
    temporary). A whole-matrix `aminmax` is vectorised: on one core it reads a bfloat16 expert
    matrix 100x faster than the float32 sum the finite check used to make, while `aminmax` along
    a dimension is as slow as that sum for long rows -- it serves only stacks of short ones
    (a convolution's per-channel kernels). None for integer, 8-bit float and meta tensors.
    """
    if tensor.is_meta or not tensor.is_floating_point() or tensor.element_size() == 1 or tensor.numel() == 0:
        return None
    if tensor.dim() < 3:  # one matrix: two scalars out, nothing stacked (a streamed read checks a few hundred per layer)
        low, high = (value.item() for value in torch.aminmax(tensor.detach().reshape(-1)))
        return [math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)]
    matrices = tensor.detach().reshape(tensor.shape[0], -1)
    if len(matrices) > 1 and matrices.shape[1] < _LONG_ROW:
        low, high = torch.aminmax(matrices, dim=1)
    else:
        low, high = (torch.stack(values) for values in zip(*(torch.aminmax(matrix) for matrix in matrices)))
    return torch.maximum(-low, high).tolist()


def check_read(tensor: torch.Tensor, what: str) -> list[float] | None:
    """Refuse a tensor just read from a checkpoint that holds NaN/Inf or values beyond `READ_BOUND`.

    Returns its `matrix_peaks` (None when it has none to check), from which callers find
    all-zero matrices and name them as they know them.
    """
    peaks = matrix_peaks(tensor)
    if peaks is None:
        return None
    if not all(math.isfinite(peak) for peak in peaks):
        raise MoECompressError(
            f"{what} contains {_bad_count(tensor)} NaN/Inf value(s) of {tensor.numel()}; compressing it would spread them. "
            "Repair or re-download the checkpoint."
        )
    peak = max(peaks)
    if peak > READ_BOUND:
        raise MoECompressError(
            f"{what} holds values up to {peak:.3g}, far beyond any trained weight (|w| <= {READ_BOUND:g}): its shard header "
            "names the wrong dtype or the tensor was written broken. Re-download or re-save the checkpoint."
        )
    return peaks


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise if `tensor` holds NaN or Inf; `what` names it in the message."""
    bad = _bad_count(tensor)
    if bad:
        raise MoECompressError(
            f"{what} contains {bad} NaN/Inf value(s) of {tensor.numel()}; fix or re-create it before compressing."
        )


@torch.no_grad()
def require_finite_weights(model: nn.Module, source: str = "the model") -> None:
    """Every parameter and buffer of `model` finite, checked one tensor at a time."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        bad = _bad_count(tensor)
        if bad:
            raise MoECompressError(
                f"weight {name} of {source} contains {bad} NaN/Inf value(s); compressing it would spread them. "
                "Repair or re-download the checkpoint."
            )


def require_finite_statistics(stats: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
    """Observed statistics must be finite before any method ranks experts by them."""
    for layer, named in stats.items():
        for name, value in named.items():
            bad = _bad_count(value)
            if bad:
                raise MoECompressError(
                    f"statistic {name!r} of MoE layer {layer} has {bad} NaN/Inf value(s): the model overflows on the "
                    f"calibration data. Use a wider {param('dtype')} (float32) or check the weights."
                )


def require_finite_numbers(values: Iterable[tuple[str, object]]) -> None:
    """Each (name, value) pair whose value is a float must be finite; `name` is shown as given."""
    for name, value in values:
        if isinstance(value, float) and not math.isfinite(value):
            raise MoECompressError(f"{name} must be a finite number; got {value}.")
