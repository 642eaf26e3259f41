"""Sparsity patterns and the one-shot scores (magnitude, Wanda) that choose which weights go.

Every weight is handled as a 2-D matrix W [out, in] with y = x W^T, whatever its storage
(a `Linear` weight, or one expert's slice of a fused -- possibly transposed -- 3-D tensor).

Two patterns:
* unstructured, fraction s: every output row loses exactly floor(s * in) weights. Comparing
  within a row (as Wanda does) keeps each output neuron alive and makes the reached sparsity
  exact and checkable per row.
* N:M semi-structured: at most N nonzeros in every group of M consecutive input columns of a
  row -- the layout sparse tensor cores accelerate (2:4, 4:8). A trailing group shorter than
  M keeps at most N as well.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import MoECompressError

#: Added before flooring s * columns so that e.g. 0.29 * 100 = 28.999999999999996 gives 29.
_EPS = 1e-9


@dataclass(frozen=True)
class SparsitySpec:
    """What to remove: a fraction per output row, or an N:M pattern (then `fraction` is unused)."""

    fraction: float = 0.0
    nm: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.nm is not None:
            n, m = self.nm
            if not (isinstance(n, int) and isinstance(m, int)) or not 1 <= n < m:
                raise MoECompressError(f"N:M sparsity needs integers 1 <= N < M (keep N of every M weights); got {n}:{m}.")
        elif not 0.0 <= self.fraction < 1.0:
            raise MoECompressError(f"sparsity must be in [0, 1): the fraction of weights to zero in each row; got {self.fraction}.")

    @property
    def target_fraction(self) -> float:
        """The fraction of weights that end up zero (N:M: 1 - N/M)."""
        return 1.0 - self.nm[0] / self.nm[1] if self.nm else self.fraction

    def pruned_per_row(self, columns: int) -> int:
        """Unstructured: how many of a row's `columns` weights are removed."""
        return int(self.fraction * columns + _EPS)

    def describe(self) -> str:
        return f"{self.nm[0]}:{self.nm[1]}" if self.nm else f"{self.fraction:g}"


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), with a clear error for anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text or "")
    if not match:
        raise MoECompressError(f"N:M sparsity must look like '2:4' (keep N of every M weights); got {text!r}.")
    n, m = int(match.group(1)), int(match.group(2))
    SparsitySpec(nm=(n, m))  # validates
    return n, m


def make_spec(sparsity: float | None = None, nm: tuple[int, int] | str | None = None) -> SparsitySpec:
    """A validated spec from the user's `sparsity` or `nm` (exactly one; default 50% unstructured)."""
    if sparsity is not None and nm is not None:
        raise MoECompressError("give either a sparsity fraction or an N:M pattern, not both.")
    if nm is not None:
        return SparsitySpec(nm=parse_nm(nm) if isinstance(nm, str) else tuple(nm))  # type: ignore[arg-type]
    return SparsitySpec(fraction=0.5 if sparsity is None else float(sparsity))


def lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask marking the `count` lowest scores of every row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.topk(scores, count, dim=1, largest=False, sorted=False).indices, True)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask of the M - N lowest scores in each group of M consecutive columns per row."""
    rows, cols = scores.shape
    full = cols - cols % m
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if full:
        grouped = scores[:, :full].reshape(rows, full // m, m)
        drop = torch.topk(grouped, m - n, dim=2, largest=False, sorted=False).indices
        mask[:, :full] = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, drop, True).reshape(rows, full)
    tail = cols - full
    if tail > n:
        mask[:, full:] = lowest_per_row(scores[:, full:], tail - n)
    return mask


def prune_mask(scores: torch.Tensor, spec: SparsitySpec) -> torch.Tensor:
    """True where a weight is removed, given per-weight importance scores [out, in]."""
    if spec.nm is not None:
        return nm_mask(scores, *spec.nm)
    return lowest_per_row(scores, spec.pruned_per_row(scores.shape[1]))


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|: the data-free baseline."""
    return weight.abs()


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, where ||X_j||^2 sums input column j over the tokens this weight saw.

    The norm says how much input column j actually carries, so a small weight on a loud input
    can outrank a larger weight on an input that is nearly always zero.
    """
    return weight.abs() * input_sq_sum.to(weight.dtype).clamp_min(0).sqrt().unsqueeze(0)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return weight.masked_fill(mask, 0.0)


def check_pattern(weight: torch.Tensor, spec: SparsitySpec) -> bool:
    """Whether `weight` [out, in] satisfies `spec` (used by tests and the summary)."""
    zeros = weight == 0
    if spec.nm is None:
        return bool((zeros.sum(dim=1) >= spec.pruned_per_row(weight.shape[1])).all())
    n, m = spec.nm
    cols = weight.shape[1]
    for start in range(0, cols, m):
        if bool(((~zeros[:, start : start + m]).sum(dim=1) > n).any()):
            return False
    return True
