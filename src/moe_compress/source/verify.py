"""`--verify-checksums`: a checkpoint's files against the hashes a Hugging Face cache records for them.

A Hub download (huggingface_hub's cache) keeps each file once, as a blob named by its hash, and
links it from the snapshot directory: `snapshots/<revision>/<file> -> ../../blobs/<hash>`. Large
(LFS) files -- every safetensors shard -- are named by their sha256, small ones (config.json,
tokenizer files) by their git blob sha1. Hashing each file again and comparing it with its blob's
name finds a flipped bit anywhere in it, header or values.

What is not checked: a checkpoint outside such a cache (written by save_pretrained or by
moe-compress, or copied out of the cache) records no hashes, and neither does a safetensors
index; there `verify_checksums` refuses rather than pass without checking anything. Without the
option, loading checks the safetensors headers (shapes, offsets, shards inside the directory) and
that every weight read is finite -- not that its bits are the ones published.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ..errors import MoECompressError, param
from ..progress import track

_CHUNK = 1 << 24  # bytes hashed per read: a shard of any size streams through a fixed buffer
_BLOB_NAMES = {"sha256": re.compile(r"[0-9a-f]{64}"), "git-sha1": re.compile(r"[0-9a-f]{40}")}
_WEIGHT_SUFFIX = ".safetensors"


def recorded_hash(path: Path) -> tuple[str, str] | None:
    """(algorithm, hex digest) that a Hugging Face cache records for `path` -- the name of the blob
    it links to -- or None for a file that is not such a link."""
    if not path.is_symlink():
        return None
    blob = path.resolve()
    if blob.parent.name != "blobs":
        return None
    return next(((algorithm, blob.name) for algorithm, pattern in _BLOB_NAMES.items() if pattern.fullmatch(blob.name)), None)


def file_hash(path: Path, algorithm: str) -> str:
    """The file's sha256, or its git blob sha1 (the sha1 of `blob <size>\\0` and the bytes), read in chunks."""
    digest = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(f"blob {path.stat().st_size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksums(source: str | Path, shown_as: str | None = None) -> list[Path]:
    """Hash every file of a Hub cache snapshot and compare it with the hash its blob is named by;
    the files verified. Refused: a file that differs, a weight file with no recorded hash, and a
    model that is not a local directory."""
    directory = Path(source)
    shown_as = shown_as or str(source)
    if not directory.is_dir():
        raise MoECompressError(
            f"{param('verify_checksums')} checks files on disk, and {shown_as} is not a local directory: download it first "
            "(`huggingface-cli download`) and pass its snapshot directory."
        )
    files = sorted(path for path in directory.iterdir() if path.is_file())
    unrecorded = [path.name for path in files if path.name.endswith(_WEIGHT_SUFFIX) and recorded_hash(path) is None]
    if unrecorded:
        raise MoECompressError(
            f"{param('verify_checksums')}: {shown_as} records no hash of {unrecorded[0]}: only a Hugging Face cache snapshot does (each file a "
            "link to a blob named by its sha256), so nothing was verified. Pass the snapshot directory of a Hub download, or run without the option."
        )
    verified = []
    for path in track(files, f"verifying checksums of {shown_as}"):
        recorded = recorded_hash(path)
        if recorded is None:
            continue
        algorithm, expected = recorded
        actual = file_hash(path, algorithm)
        if actual != expected:
            raise MoECompressError(
                f"{path.name} of {shown_as} does not match the {algorithm} its Hugging Face cache records ({expected[:16]}..., "
                f"but the file hashes to {actual[:16]}...): it is damaged. Download it again (`huggingface-cli download ... --force-download`)."
            )
        verified.append(path)
    return verified
