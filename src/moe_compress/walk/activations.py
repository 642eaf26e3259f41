"""Calibration activations between layers: in RAM up to a budget, then in files under an offload dir.

A layer walk holds two generations of hidden states at a time -- the current layer's inputs
and the outputs it is producing -- each one tensor per calibration batch, [b, s, H]. For a
large model and a big calibration set that is gigabytes (512 sequences x 2048 tokens x 7168
x 2 bytes = 15 GB for DeepSeek-V3). `Activations` keeps tensors in memory while the total
stays under `max_bytes` and writes the rest as raw files into `offload_dir`, reading each
back when its layer needs it; the files of a generation are deleted as soon as it is consumed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoECompressError, param


@dataclass
class _Spilled:
    path: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor:
        count = 1
        for size in self.shape:
            count *= size
        return torch.from_file(str(self.path), shared=False, size=count, dtype=self.dtype).view(self.shape)


class Activations:
    """Storage for one run's hidden states; `None` budget keeps everything in memory."""

    def __init__(self, max_bytes: int | None = None, offload_dir: str | Path | None = None):
        if max_bytes is not None and max_bytes < 0:
            raise MoECompressError(f"the activation memory budget must be >= 0 bytes; got {max_bytes}.")
        self.max_bytes = max_bytes
        self.parent = Path(offload_dir) if offload_dir is not None else None
        self._directory: Path | None = None
        self._in_memory = 0
        self._counter = 0

    def _dir(self) -> Path:
        if self._directory is None:
            parent = self.parent or Path(tempfile.gettempdir())
            try:
                parent.mkdir(parents=True, exist_ok=True)
                self._directory = Path(tempfile.mkdtemp(prefix="moe-compress-activations-", dir=parent))
            except OSError as exc:
                raise MoECompressError(f"cannot use offload dir {parent}: {exc.strerror}. Choose a writable {param('offload_dir')}.") from None
        return self._directory

    def keep(self, tensor: torch.Tensor) -> torch.Tensor | _Spilled:
        """Store one batch's activations (on the CPU); returns a handle for `get`."""
        tensor = tensor.detach().to("cpu")
        size = tensor.numel() * tensor.element_size()
        if self.max_bytes is None or self._in_memory + size <= self.max_bytes:
            self._in_memory += size
            return tensor
        path = self._dir() / f"{self._counter:08d}.bin"
        self._counter += 1
        try:
            with open(path, "wb") as handle:
                handle.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise MoECompressError(
                    f"offload dir {self._dir().parent} is full ({size / 2**20:.0f} MiB more needed for activations): "
                    f"free space there, choose another {param('offload_dir')}, or raise {param('max_activation_memory')}."
                ) from None
            raise MoECompressError(f"cannot write activations to {path}: {exc.strerror}.") from None
        return _Spilled(path, tuple(tensor.shape), tensor.dtype)

    @staticmethod
    def get(handle: torch.Tensor | _Spilled) -> torch.Tensor:
        return handle.load() if isinstance(handle, _Spilled) else handle

    def release(self, handles: list[torch.Tensor | _Spilled]) -> None:
        """Forget a consumed generation: its memory is returned and its files deleted."""
        for handle in handles:
            if isinstance(handle, _Spilled):
                handle.path.unlink(missing_ok=True)
            else:
                self._in_memory -= handle.numel() * handle.element_size()

    def close(self) -> None:
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __del__(self) -> None:
        if os is not None:  # interpreter shutdown
            self.close()


_DEFAULT: list[tuple[int | None, str | Path | None]] = [(None, None)]


@contextmanager
def activation_budget(max_bytes: int | None, offload_dir: str | Path | None = None) -> Iterator[None]:
    """Every layer walk inside the block keeps at most `max_bytes` of activations in RAM (None: no limit)."""
    _DEFAULT.append((max_bytes, offload_dir))
    try:
        yield
    finally:
        _DEFAULT.pop()


def default_activations() -> Activations:
    return Activations(*_DEFAULT[-1])
