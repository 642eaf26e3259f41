"""Calibration shared across processes and machines with torch.distributed.

Launch any compressing command under torchrun:

    torchrun --nproc-per-node 4 [--nnodes 2 --node-rank R --master-addr HOST] -m moe_compress.cli prune MODEL ...

Every rank opens the same model (streamed or in memory), tokenises the same calibration set
and walks the same layer at the same time, observing its share of the batches (rank r takes
batches r, r + W, r + 2W, ...). Accumulated statistics are then combined exactly: each
statistic's own merge (float64 sums add, moments merge by Chan's rule, maxima take the max)
folds the ranks' parts in rank order, and per-batch statistics are put back in batch order.
Rank 0 decides the plan and writes the output; the other ranks wait at a barrier and exit.
Slimming all-reduces every weight's input statistics (Wanda norms, SparseGPT Hessians) before
pruning a layer, so all ranks prune it identically and feed the same outputs to the next.

Backend: NCCL when computing on CUDA, gloo on CPU. A rank that fails exits with an error;
torchrun then stops the others, and a rank waiting on a peer that never comes gives up after
`MOE_COMPRESS_DIST_TIMEOUT` seconds (default 1800) instead of hanging.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import MoECompressError, OptionError, param


def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank; before the group is joined, the one its launcher assigned (RANK)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_environment(device: str = "cpu") -> str:
    """Join the process group torchrun describes; returns this rank's device (cuda:LOCAL_RANK on GPUs)."""
    if not launched() or active():
        return device
    on_gpu = torch.device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        if not torch.cuda.is_available():
            raise OptionError("device", "cuda was given but no GPU is visible to this process.")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    timeout = timedelta(seconds=float(os.environ.get("MOE_COMPRESS_DIST_TIMEOUT", "1800")))
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timeout)
    return device


def check_shareable(batches: int) -> None:
    """Every rank needs at least one calibration batch."""
    if batches < world_size():
        raise MoECompressError(
            f"{batches} calibration batch(es) cannot be shared by {world_size()} ranks: give at least one batch per rank "
            f"(more {param('samples')} or a smaller {param('batch_size')})."
        )


def shard(items: list) -> list:
    """This rank's share: items r, r + W, r + 2W, ..."""
    return items[rank() :: world_size()]


def barrier() -> None:
    if active():
        dist.barrier()


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (first dimensions may differ between ranks), in rank order, on every rank."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = tensor.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0] if local.dim() else 1], device=device))
    widest = int(max(s.item() for s in sizes))
    padded = local.reshape(-1) if local.dim() == 0 else local
    if padded.shape[0] < widest:
        padding = padded.new_zeros((widest - padded.shape[0], *padded.shape[1:]))
        padded = torch.cat([padded, padding])
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded.contiguous())
    trimmed = [part[: int(size.item())] for part, size in zip(parts, sizes)]
    return [part.reshape(tensor.shape) if tensor.dim() == 0 else part for part in (t.cpu() for t in trimmed)]


def combine(value: torch.Tensor, merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], per_batch: bool = False) -> torch.Tensor:
    """One statistic's value over all ranks, identical on every rank.

    `merge` folds the ranks' parts in rank order; a per-batch statistic (one row per
    calibration batch) is instead interleaved back into the order of the batches.
    """
    if not active():
        return value
    parts = _gather(value)
    if per_batch:
        rows = [None] * sum(part.shape[0] for part in parts)
        for r, part in enumerate(parts):
            for i in range(part.shape[0]):
                rows[r + i * world_size()] = part[i]
        return torch.stack(rows)
    total = parts[0]
    for part in parts[1:]:
        total = merge(total, part)
    return total


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op in a single process)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
