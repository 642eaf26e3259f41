"""Per-expert output moments (count, mean, M2): computed per batch, merged exactly, read back.

Several methods need each expert's mean output and its variance over the tokens routed to it
(MoNE's novices, the super-expert check, C-Prune's cosine variant); batches, and ranks, are
folded in with Chan's pairwise update so that variances stay accurate however many are merged.
"""

from __future__ import annotations

import torch

from .routed_batch import RoutedBatch


def batch_moments(batch: RoutedBatch) -> torch.Tensor:
    """[E, 1 + 2H]: per expert, count of routed tokens, mean output, sum of squared deviations.

    Two passes (mean, then squared deviations from it), so there is no cancellation, in float64
    (see `routed_batch`'s note on determinism); batches are then merged in float64 (Chan). Each
    expert's pairs are contiguous, so one expert's rows at a time are widened from the layer's
    dtype: no copy of every output, and faster on CPU than a float32 `index_add_` over all pairs.
    """
    rows = []
    for part in torch.split(batch.layer_outputs, batch.counts.tolist()):
        total = part.sum(0, dtype=torch.float64)
        mean = total / max(part.shape[0], 1)
        deviation = part.double() - mean
        rows.append(torch.cat([total.new_tensor([part.shape[0]]), mean, (deviation * deviation).sum(0)]))
    return torch.stack(rows).cpu()


def merge_moments(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chan et al.'s pairwise combination of (count, mean, M2) per expert."""
    hidden = (a.shape[1] - 1) // 2
    n_a, n_b = a[:, :1], b[:, :1]
    n = n_a + n_b
    safe_n = n.clamp_min(1)
    delta = b[:, 1 : 1 + hidden] - a[:, 1 : 1 + hidden]
    mean = a[:, 1 : 1 + hidden] + delta * n_b / safe_n
    m2 = a[:, 1 + hidden :] + b[:, 1 + hidden :] + delta**2 * n_a * n_b / safe_n
    return torch.cat([n, mean, m2], dim=1)


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count [E], mean [E, H], population variance [E, H]) from accumulated moments."""
    hidden = (moments.shape[1] - 1) // 2
    count = moments[:, 0]
    variance = moments[:, 1 + hidden :] / count.clamp_min(1).unsqueeze(1)
    return count, moments[:, 1 : 1 + hidden], variance


def output_moments(layer_stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's whole-calibration output moments, from `output_moments` or merged from its per-batch ones.

    MoNE's running variance collects only the per-batch statistic; its novice vectors (and the
    super-expert repair of a MoNE plan) still need the means over the whole calibration.
    """
    if "output_moments" in layer_stats:
        return layer_stats["output_moments"]
    per_batch = layer_stats["output_moments_per_batch"]
    merged = per_batch[0]
    for moments in per_batch[1:]:
        merged = merge_moments(merged, moments)
    return merged
