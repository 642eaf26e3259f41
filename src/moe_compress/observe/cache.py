"""Disk cache of observed statistics, keyed by (model, calibration data, statistic set).

Calibration is the expensive step; a second method or ratio on the same model and data must
not pay for it again. The model key samples every parameter (name, shape, dtype and a strided
subset of values), so a different or modified model never hits a stale entry, without
hashing gigabytes of weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CACHE_VERSION = "1"
_SAMPLES_PER_TENSOR = 4096


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOE_COMPRESS_CACHE", Path.home() / ".cache" / "moe_compress")) / "stats"


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(model_fp: str, data_fp: str, names: tuple[str, ...]) -> str:
    text = json.dumps([CACHE_VERSION, model_fp, data_fp, sorted(names)])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StatsCache:
    """Statistics per MoE layer stored as one safetensors file per key."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def load(self, key: str) -> dict[int, dict[str, torch.Tensor]] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            flat = load_file(str(path))
        except Exception:  # a damaged cache entry is recomputed, never fatal
            return None
        stats: dict[int, dict[str, torch.Tensor]] = {}
        for flat_key, value in flat.items():
            layer, name = flat_key.split("/", 1)
            stats.setdefault(int(layer), {})[name] = value
        return stats

    def save(self, key: str, stats: dict[int, dict[str, torch.Tensor]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        flat = {f"{layer}/{name}": value.contiguous() for layer, named in stats.items() for name, value in named.items()}
        partial = self._path(key).with_suffix(".partial")
        save_file(flat, str(partial))
        partial.replace(self._path(key))
