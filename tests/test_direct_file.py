"""The checkpoint writer's file (sink/direct_file.py): the same bytes as a plain write, whichever way the disk takes them."""

import os
import random
import struct

import pytest
import torch
from safetensors.torch import load_file

from moe_compress.sink import direct_file
from moe_compress.sink.direct_file import ALIGNMENT, DirectFile
from moe_compress.sink.writer import ShardWriter, write_safetensors

CHUNK = 4 * ALIGNMENT
SIZES = [0, 1, ALIGNMENT - 1, ALIGNMENT, ALIGNMENT + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17]


def _write_in_pieces(path, data: bytes, direct: bool, seed: int) -> DirectFile:
    pieces = random.Random(seed)
    with DirectFile(path, chunk=CHUNK, depth=2, direct=direct) as file:
        at = 0
        while at < len(data):
            step = pieces.randint(1, CHUNK + ALIGNMENT)
            assert file.write(data[at : at + step]) == len(data[at : at + step])
            at += step
    return file


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_the_file_holds_exactly_the_bytes_written(tmp_path, size, direct):
    data = random.Random(size).randbytes(size)
    file = _write_in_pieces(tmp_path / "f.bin", data, direct, seed=size)
    assert (tmp_path / "f.bin").read_bytes() == data  # the last buffer's padding is cut off
    assert file.size == size


def test_a_write_refused_for_its_alignment_goes_through_the_page_cache(tmp_path, monkeypatch):
    calls = []
    real = os.pwrite

    def picky(fd, data, offset):  # a file system that took O_DIRECT at open but refuses the writes
        calls.append(offset)
        if len(calls) == 1:
            raise OSError(22, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_file.os, "pwrite", picky)
    data = random.Random(1).randbytes(2 * CHUNK + 5)
    file = _write_in_pieces(tmp_path / "f.bin", data, direct=True, seed=1)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert not file.direct and len(calls) >= 2


def test_a_disk_error_is_raised_to_the_writer():
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    with pytest.raises(OSError, match="No space left"):
        with DirectFile("/dev/full", chunk=CHUNK, depth=2) as file:
            file.write(bytes(5 * CHUNK))


def test_a_shard_written_in_the_background_reads_back_the_same(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(37, 129, generator=generator).to(dtype) for i, dtype in
               enumerate([torch.bfloat16, torch.float32, torch.float16])}
    writer = ShardWriter(tmp_path, max_shard_bytes=2 * 37 * 129 * 4, flush_bytes=1)
    for name, tensor in tensors.items():
        writer.add({name: tensor})
    paths = writer.finish()
    assert len(paths) == 3
    loaded = {k: v for path in paths for k, v in load_file(path).items()}
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    # byte for byte: the 8-byte header length, the header, then each tensor's own memory
    write_safetensors(tmp_path / "single.safetensors", tensors)
    stored = (tmp_path / "single.safetensors").read_bytes()
    data = stored[8 + struct.unpack("<Q", stored[:8])[0] :]
    assert data == b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
