"""Where tensors come from: a safetensors checkpoint read tensor by tensor, never whole.

A checkpoint is a directory with `model.safetensors` or shards listed in
`model.safetensors.index.json`. Only the headers are read up front (names, dtypes, shapes);
a tensor's bytes are read when it is asked for, with `pread` rather than a memory map, so
the memory a tensor costs is exactly the tensor and is returned the moment it is dropped --
a mapped shard would keep every page it ever touched resident and make peak memory grow
with the checkpoint. (A table of which only some rows are looked up is the exception:
`Checkpoint.mapped`, for the duration of the lookup.)

Each tensor is checked the first time it is read, in one pass over what was read anyway
(`finite.check_read`): NaN/Inf and magnitudes no trained model has are refused, an all-zero
matrix or quantisation scale is warned about, and a shard whose every tensor read as zeros
is refused as zero-filled. Header offsets that do not tile a shard's data are refused with
the tensor they misplace; dtypes a parameter cannot have are refused by `source.sanity`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import MoECompressError, warn
from ..finite import check_read
from .headers import ELEMENT_BYTES, TensorInfo, offset_fault, read_header, shard_files


def zero_checked(name: str, tensor: torch.Tensor) -> bool:
    """Whether `tensor` being all zeros is suspect: a weight matrix (or a stack of them) or a quantisation
    scale. Zero vectors are legitimate (untrained biases; the novice vectors of a `--no-novice` MoNE output)."""
    leaf = name.rsplit(".", 1)[-1]
    return "scale" in leaf or tensor.dim() >= 2 and leaf.endswith(("weight", "proj"))


def zero_filled(shard: Path) -> MoECompressError:
    """The refusal of a shard that read as zeros throughout (streamed or loaded whole)."""
    return MoECompressError(
        f"checkpoint shard {shard.name} is zero-filled: every tensor read from it is all zeros (an interrupted download or copy). "
        "Re-download it."
    )


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, read lazily by name."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for shard in shard_files(self.directory):
            try:
                with safe_open(str(shard), framework="pt") as handle:
                    self.metadata.update(handle.metadata() or {})
                    for key in handle.keys():
                        view = handle.get_slice(key)
                        self.tensors[key] = TensorInfo(shard, view.get_dtype(), tuple(view.get_shape()))
            except (SafetensorError, OSError) as exc:
                raise MoECompressError(
                    f"checkpoint file {shard} is corrupt or truncated ({exc}{offset_fault(shard)}). Re-download or re-save the checkpoint."
                ) from None
        self._unread = {}  # shard -> its keys not read yet: each is checked on its first read
        for key, info in self.tensors.items():
            self._unread.setdefault(info.shard, set()).add(key)
        self._nonzero_shards: set[Path] = set()  # shards a non-zero value was read from
        self._zero_warnings: dict[Path, str | None] = {}  # the warning about a shard's first all-zero matrix (None once shown)
        self._offsets: dict[Path, dict[str, int]] = {}  # shard -> {key: file offset of its bytes}, parsed on first direct read

    def keys(self) -> list[str]:
        return list(self.tensors)

    def nbytes(self, key: str) -> int:
        info = self.tensors[key]
        return info.numel * ELEMENT_BYTES.get(info.dtype, 2)

    def total_bytes(self) -> int:
        return sum(self.nbytes(key) for key in self.tensors)

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read into its own memory."""
        with safe_open(str(self.tensors[key].shard), framework="pt", backend="pread") as handle:
            return self.first_read(key, handle.get_tensor(key))

    def read_into(self, reads: list[tuple[str, torch.Tensor]], check: bool = True) -> None:
        """Read each key's bytes straight into its tensor (a contiguous CPU tensor of the key's dtype and size).

        One copy, from the page cache into memory the caller chose: no buffer of its own, so
        a fused expert tensor is filled in place (`source.direct`) and a reused buffer faults no
        new pages. Each tensor is checked as `read` checks it (`check=False` for part of a
        tensor, such as an embedding's used rows, which is not the tensor's first read).
        """
        descriptors: dict[Path, int] = {}
        try:
            for key, out in reads:
                shard = self.tensors[key].shard
                if shard not in descriptors:
                    descriptors[shard] = os.open(shard, os.O_RDONLY)
                _pread_exactly(descriptors[shard], out, self._offset(key), shard)
                if check:
                    self.first_read(key, out)
        finally:
            for descriptor in descriptors.values():
                os.close(descriptor)

    def mapped(self, key: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Tensor `key` as a private read-only view of its shard's mapping (None where its bytes cannot be viewed as `dtype`).

        Nothing is read up front and nothing checked: each page is read when first touched and
        the mapping goes with the tensor. For a table of which a block looks up a few rows (an
        input embedding during a walk's stem) that costs those rows, not the table.
        """
        start = self._offset(key)
        if start % dtype.itemsize:
            return None
        shard = self.tensors[key].shard
        whole = torch.from_file(str(shard), shared=False, size=shard.stat().st_size, dtype=torch.uint8)
        return whole[start : start + self.nbytes(key)].view(dtype).view(self.tensors[key].shape)

    def same_bytes(self, key: str, other: Checkpoint, chunk: int = 16 * 2**20) -> bool:
        """Whether `other` stores `key` with this checkpoint's dtype, shape and bytes, compared `chunk` bytes at a
        time: what lets two models share one tensor (`source.identical`) costs a read of both, not a copy of either."""
        mine, theirs = self.tensors.get(key), other.tensors.get(key)
        if mine is None or theirs is None or (mine.dtype, mine.shape) != (theirs.dtype, theirs.shape):
            return False
        size, starts = self.nbytes(key), (self._offset(key), other._offset(key))
        with open(mine.shard, "rb", buffering=0) as a, open(theirs.shard, "rb", buffering=0) as b:
            for done in range(0, size, chunk):
                length = min(chunk, size - done)
                if os.pread(a.fileno(), length, starts[0] + done) != os.pread(b.fileno(), length, starts[1] + done):
                    return False
        return True

    def _offset(self, key: str) -> int:
        shard = self.tensors[key].shard
        if shard not in self._offsets:
            length, header = read_header(shard)  # validated when opened: safetensors refused any malformed one
            self._offsets[shard] = {k: 8 + length + entry["data_offsets"][0] for k, entry in header.items() if k != "__metadata__"}
        return self._offsets[shard][key]

    def first_read(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`, just read as `key`, checked if this is its first read (see the module's docstring)."""
        shard = self.tensors[key].shard
        unread = self._unread[shard]
        if key not in unread or tuple(tensor.shape) != self.tensors[key].shape:
            return tensor  # checked before, or a part of it (a tensor-parallel slice)
        peaks = check_read(tensor, f"checkpoint tensor {key}")
        unread.discard(key)
        if peaks is not None:
            if any(peaks):
                self._nonzero_shards.add(shard)
            if not all(peaks) and zero_checked(key, tensor):
                self._zero_warnings.setdefault(shard, self._zero_warning(key, peaks))
        if shard in self._nonzero_shards and self._zero_warnings.get(shard):
            warn(self._zero_warnings[shard])
            self._zero_warnings[shard] = None
        if not unread and shard in self._zero_warnings and shard not in self._nonzero_shards:
            raise zero_filled(shard)
        return tensor

    def _zero_warning(self, key: str, peaks: list[float]) -> str:
        """About an all-zero matrix or scale, which a trained model has none of. It is shown once a non-zero
        value is read from the same shard: a shard that reads as zeros throughout is refused instead."""
        which = f"matrix {peaks.index(0)} of " if len(peaks) > 1 else ""
        return (
            f"{which}checkpoint tensor {key} is all zeros, which a trained model's weights and scales never are: "
            f"{self.tensors[key].shard.name} may be damaged; re-download it if the output looks wrong "
            "(further all-zero tensors of it are not listed)."
        )

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
            slices[key] = _CheckedSlice(self, key, handles[shard].get_slice(key))
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


def _pread_exactly(descriptor: int, out: torch.Tensor, offset: int, shard: Path) -> None:
    """Fill contiguous CPU tensor `out` with the bytes of `descriptor` from `offset` on."""
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        read = os.preadv(descriptor, [view[done : done + _MAX_READ]], offset + done)
        if read == 0:
            raise MoECompressError(f"checkpoint file {shard} ends early (truncated); re-download or re-save the checkpoint.")
        done += read


_MAX_READ = 1 << 30  # Linux reads at most 2 GiB - 4 KiB per call


class _CheckedSlice:
    """A safetensors slice whose reads pass through `Checkpoint.first_read`."""

    def __init__(self, checkpoint: Checkpoint, key: str, raw):
        self._checkpoint, self._key, self._raw = checkpoint, key, raw

    def __getitem__(self, index) -> torch.Tensor:
        return self._checkpoint.first_read(self._key, self._raw[index])

    def __getattr__(self, name: str):
        return getattr(self._raw, name)
