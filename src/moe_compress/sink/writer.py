"""Where tensors go: safetensors shards written group by group, never the whole model at once.

`ShardWriter` receives the output checkpoint in groups (the embeddings, one decoder layer,
the head, ...), already under their checkpoint names, and writes shards of at most
`max_shard_bytes` (a group larger than that gets a shard of its own). A shard is written as
soon as it holds `flush_bytes`, before the next group is produced, so at most that much waits
in memory beside the layer being written: saving costs one layer, whatever the size of the
model (a real model's layers, hundreds of MB and more, each end up in a shard of their own). The file format is safetensors, written by `write_safetensors`:
`safetensors.torch.save_file` first copies every tensor into a bytes object, which at 20 GB
per DeepSeek-V3 layer would double the peak; this writer streams each tensor's own memory
to the file instead. Files are read back with the safetensors library like any other.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import torch

from ..source.headers import INDEX_FILE, SINGLE_FILE
from .direct_file import DirectFile

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ALIGN = 8


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, wait: bool = True) -> DirectFile:
    """Write `tensors` (in the given order) as one safetensors file, one tensor's memory at a time.

    The file is written around the page cache by a thread of its own (`sink.direct_file`): with `wait=False`
    this returns once every byte is copied out of `tensors` (they may be freed), and the returned file's
    `wait()` says when the disk has them."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"cannot store {name} of dtype {tensor.dtype} in safetensors")
        size = tensor_bytes(tensor)
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)
    handle = DirectFile(path)
    try:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for tensor in tensors.values():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                handle.write(memoryview(flat.view(torch.uint8).numpy()))
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped the writing is the one to report
            handle.close()
        raise
    handle.close(wait=wait)
    return handle


class ShardWriter:
    """Collects groups of named tensors into shards of bounded size, then writes the index."""

    def __init__(self, directory: Path, max_shard_bytes: int, flush_bytes: int = 2**28):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.flush_bytes = min(flush_bytes, max_shard_bytes)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._written: set[str] = set()
        self._writing: DirectFile | None = None  # the last shard, while its thread writes it
        self.total_bytes = 0

    def add(self, group: dict[str, torch.Tensor]) -> None:
        """Queue one group; the open shard is written first if the group would overflow it."""
        size = sum(tensor_bytes(t) for t in group.values())
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        for name, tensor in group.items():
            if name in self._written:
                raise ValueError(f"tensor {name} written twice")
            self._written.add(name)
            self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size
        if self._pending_bytes >= self.flush_bytes:
            self._flush()

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._shards) + 1:05d}.safetensors"
        self._wait()  # one shard on its way to the disk at a time: its buffers are all the writing holds
        self._writing = write_safetensors(path, self._pending, wait=False)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def _wait(self) -> None:
        if self._writing is not None:
            self._writing.wait()
            self._writing = None

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names and write the index if sharded."""
        if self._pending or not self._shards:
            self._flush()
        self._wait()
        count = len(self._shards)
        names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        weight_map = {}
        final = []
        for (path, keys), name in zip(self._shards, names):
            path.rename(self.directory / name)
            final.append(self.directory / name)
            weight_map.update({key: name for key in keys})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return final
