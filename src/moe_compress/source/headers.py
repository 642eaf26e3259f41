"""A safetensors checkpoint's shard files and headers, read without torch.

The header is JSON after an 8-byte little-endian length: names, dtypes, shapes and offsets.
`Checkpoint` (which reads tensors, with torch) and `inspect` (which only counts, and must
start in a fraction of the time torch takes to import) both read them from here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

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


ELEMENT_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                 "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}


def read_header(shard: Path) -> tuple[int, dict]:
    """(header length in bytes, the parsed header) of a safetensors file; raises OSError/ValueError/struct.error."""
    with shard.open("rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        return length, json.loads(handle.read(min(length, 1 << 27)))


def offset_fault(shard: Path) -> str:
    """The first tensor whose header offsets do not fit the shard's data section, as a clause
    ('' if none is found or the header is not even JSON).

    safetensors refuses such a header, but without saying which tensor it misplaces; the
    ranges, in order, must tile the data exactly, each as long as its dtype and shape need.
    """
    try:
        length, header = read_header(shard)
        data_bytes = shard.stat().st_size - 8 - length
        ranges = sorted(
            (entry["data_offsets"][0], entry["data_offsets"][1], key, entry["dtype"], entry["shape"])
            for key, entry in header.items() if key != "__metadata__"
        )
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error):
        return ""
    end = 0
    for start, stop, key, dtype, shape in ranges:
        needed = TensorInfo(shard, dtype, tuple(shape)).numel * ELEMENT_BYTES.get(dtype, 0)
        if stop - start != needed:
            return f"; tensor {key} spans {stop - start} bytes, but {dtype} {list(shape)} needs {needed}: its offsets are wrong or swapped"
        if start != end:
            return f"; tensor {key} starts at byte {start} of the data where byte {end} is next: offsets {'overlap' if start < end else 'leave a gap'}"
        end = stop
    return f"; its tensors end at byte {end} of the {data_bytes} data bytes" if end != data_bytes else ""


def shard_files(directory: Path) -> list[Path]:
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
