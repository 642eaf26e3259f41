"""Where tensors come from: a safetensors checkpoint read tensor by tensor, never whole.

A checkpoint is a directory with `model.safetensors` or shards listed in
`model.safetensors.index.json`. Only the headers are read up front (names, dtypes, shapes);
a tensor's bytes are read when it is asked for, with `pread` rather than a memory map, so
the memory a tensor costs is exactly the tensor and is returned the moment it is dropped --
a mapped shard would keep every page it ever touched resident and make peak memory grow
with the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import MoECompressError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    """A checkpoint tensor's header entry."""

    shard: Path
    dtype: str  # safetensors dtype name, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


_ELEMENT_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                  "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}


def _shards(directory: Path) -> list[Path]:
    """The shard files of a checkpoint, each checked to lie inside `directory`."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MoECompressError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint.") from None
        shards = []
        for name in sorted(set(weight_map.values())):
            # A shard is a plain file name in this directory. It may be a symlink (Hugging Face cache
            # snapshots link to blobs elsewhere): only the name is checked, not where it points.
            if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
                raise MoECompressError(f"{index} names shard {name!r} outside the checkpoint directory; refusing to read it.")
            path = directory / name
            if not path.is_file():
                raise MoECompressError(f"{index} lists shard {name!r}, which is missing from {directory}; re-download the checkpoint.")
            shards.append(path)
        return shards
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:  # unpickling runs arbitrary code: never attempted
            raise MoECompressError(
                f"{directory} holds PyTorch pickle weights ({', '.join(pickles)}), which can run arbitrary code when "
                "loaded; moe-compress reads safetensors only. Convert them in a trusted environment "
                "(load, then save_pretrained(..., safe_serialization=True))."
            )
        raise MoECompressError(f"{directory} holds no safetensors weights; moe-compress reads only safetensors checkpoints.")
    return found


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, read lazily by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for shard in _shards(self.directory):
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    self.metadata.update(handle.metadata() or {})
                    for key in handle.keys():
                        view = handle.get_slice(key)
                        self.tensors[key] = TensorInfo(shard, view.get_dtype(), tuple(view.get_shape()))
            except (SafetensorError, OSError) as exc:
                raise MoECompressError(f"checkpoint file {shard} is corrupt or truncated ({exc}). Re-download or re-save the checkpoint.") from None

    def keys(self) -> list[str]:
        return list(self.tensors)

    def nbytes(self, key: str) -> int:
        info = self.tensors[key]
        return info.numel * _ELEMENT_BYTES.get(info.dtype, 2)

    def total_bytes(self) -> int:
        return sum(self.nbytes(key) for key in self.tensors)

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read into its own memory."""
        with safe_open(str(self.tensors[key].shard), framework="pt", backend="pread") as handle:
            return handle.get_tensor(key)

    def lazy(self, keys: list[str]) -> dict[str, object]:
        """Slices for `keys` that read their bytes only when indexed (what transformers' loader takes).

        The shard handles stay open as long as a slice refers to them.
        """
        handles: dict[Path, object] = {}
        slices = {}
        for key in keys:
            shard = self.tensors[key].shard
            if shard not in handles:
                handles[shard] = safe_open(str(shard), framework="pt", backend="pread")
            slices[key] = handles[shard].get_slice(key)
        return slices

    def fingerprint(self) -> str:
        """Identifies these weights without reading them: every shard's tensor headers, size and mtime.

        Rewriting a shard changes its mtime (and usually its size), so a modified checkpoint
        never matches a fingerprint taken before; reading 1 TB of weights to hash them would
        cost more than the calibration the fingerprint lets a cache skip.
        """
        import hashlib

        digest = hashlib.sha256()
        for key in sorted(self.tensors):
            info = self.tensors[key]
            digest.update(f"{key}:{info.dtype}:{info.shape}:{info.shard.name}\n".encode())
        for shard in sorted({info.shard for info in self.tensors.values()}):
            stat = shard.stat()
            digest.update(f"{shard.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]
