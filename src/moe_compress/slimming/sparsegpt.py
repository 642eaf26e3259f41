"""SparseGPT (Frantar & Alistarh, 2023): prune a weight matrix and fix the rest to compensate.

Written from the paper's description. For one matrix W [out, in] whose inputs X have the
Hessian H = X^T X (of the layer-wise squared error ||W X - W' X||^2), columns are visited left
to right. Removing weight w_rc costs w_rc^2 / [H^-1]_cc and the optimal (OBS) correction of
the remaining, not yet visited weights of row r is -w_rc / [H^-1]_cc * H^-1[c, c:]. Because the
visited columns are then frozen, the inverse Hessians of all the shrinking sub-problems are the
rows of one upper Cholesky factor U of H^-1, so the whole matrix costs one factorisation.

Details of this implementation:
* Lazy batches: corrections inside a block of B columns are applied at once to the block;
  the rest of the matrix gets the block's accumulated errors in one matrix product.
* Adaptive masks: the mask of a block is chosen when the block is reached, from the already
  corrected weights, with score w^2 / U_cc^2. Unstructured masks are chosen per output row
  with the row's cumulative quota, so every row ends with exactly floor(s * in) zeros (the
  paper picks one threshold per block for all rows; per-row quotas make the reached sparsity
  exact, as Wanda's). N:M masks are chosen for each group of M columns when it is reached.
* Damping lambda = damp * mean(diag H) keeps H invertible; input columns that never carried
  a value (diag H = 0) cost nothing to prune on the calibration data and are pruned first.
"""

from __future__ import annotations

import torch

from .sparsity import SparsitySpec, lowest_per_row, nm_mask


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = 0.01, attempts: int = 4) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1, so that H^-1 = U^T U.

    If H is too ill-conditioned for the requested damping, the damping grows tenfold per
    attempt: a slightly over-damped solution is still far better than none.
    """
    hessian = hessian.clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    mean_diag = torch.diagonal(hessian).mean().clamp_min(1e-12)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(attempts):
        try:
            lower = torch.linalg.cholesky(hessian + damp * (10**attempt) * mean_diag * eye)
            inverse = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp * 10 ** (attempts - 1)}")


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: SparsitySpec,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """The pruned and corrected copy of `weight` [out, in]; computed in the Hessian's dtype.

    `hessian` [in, in] is X^T X (any positive scale) of the inputs this weight sees.
    """
    compute = hessian.dtype if hessian.dtype in (torch.float32, torch.float64) else torch.float32
    work = weight.detach().to(compute).clone()
    hessian = hessian.to(compute)
    dead = torch.diagonal(hessian) == 0
    factor = inverse_hessian_factor(hessian, damp)
    columns = work.shape[1]
    if spec.nm is not None:
        group = spec.nm[1]
        blocksize = max(group, blocksize - blocksize % group)  # groups never straddle blocks
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = work[:, start:end].clone()
        local = factor[start:end, start:end]
        diag = torch.diagonal(local)
        block_dead = dead[start:end]
        errors = torch.zeros_like(block)

        def scores(lo: int, hi: int) -> torch.Tensor:
            value = block[:, lo:hi] ** 2 / diag[lo:hi].unsqueeze(0) ** 2
            return value.masked_fill(block_dead[lo:hi].unsqueeze(0), 0.0)

        if spec.nm is None:
            quota = spec.pruned_per_row(end) - spec.pruned_per_row(start)
            mask = lowest_per_row(scores(0, end - start), quota)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for j in range(end - start):
            if spec.nm is not None and j % spec.nm[1] == 0:
                hi = min(j + spec.nm[1], end - start)
                mask[:, j:hi] = nm_mask(scores(j, hi), *spec.nm)
            error = torch.where(mask[:, j], block[:, j], 0.0) / diag[j]
            block[:, j:] -= error.unsqueeze(1) * local[j, j:].unsqueeze(0)
            errors[:, j] = error
        block[mask] = 0.0  # the update leaves them at rounding noise; make them exact zeros
        work[:, start:end] = block
        if end < columns:
            work[:, end:] -= errors @ factor[start:end, end:]
    return work
