"""Read documents from wherever calibration or evaluation text lives, lazily.

Sources, in the order they are tried:
  * ``bundled`` or ``bundled:<domain>[,<domain>]`` -- the project's own held-out text
    (``<split>`` file of each domain: calib, valid or test);
  * a local file: ``.txt``/``.md`` (documents separated by blank lines), ``.jsonl``/``.json``
    (one JSON object per line, text under ``text_field``), ``.parquet`` (column ``text_field``;
    null cells are skipped);
  * a local directory: every such file below it, in sorted order;
  * ``hf:<dataset>[:<config>][@<split>]`` -- a Hugging Face dataset (needs network; streamed).

`iter_documents` yields documents one at a time, so a caller that needs only the beginning of
a large source (calibration, see `batches.calibration_batches`) reads only that much;
`max_chars` cuts each document so that one huge document (a 30 MB single-line file) is never
held or tokenised whole. Malformed input -- a line that is not a JSON object, a text that is
not a string (`"text": null` used to become the word "None"), a corrupt parquet file -- is
refused with its file and line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import MoECompressError, param

BUNDLED_DATA = Path(__file__).resolve().parent.parent / "assets" / "data"
TEXT_SUFFIXES = {".txt", ".md", ".jsonl", ".json", ".parquet"}


def bundled_domains() -> list[str]:
    return sorted(p.name for p in BUNDLED_DATA.iterdir() if p.is_dir()) if BUNDLED_DATA.is_dir() else []


def _clip(text: str, max_chars: int | None) -> str:
    return text if max_chars is None else text[:max_chars]


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _read_paragraphs(path: Path, max_chars: int | None) -> Iterator[str]:
    """Blank-line separated documents; lines past a document's `max_chars` are read but not kept."""
    parts: list[str] = []
    kept = 0
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                if max_chars is None or kept < max_chars:
                    parts.append(line if max_chars is None else line[: max_chars - kept])
                    kept += len(parts[-1])
                continue
            if parts:
                yield _clip("".join(parts).strip(), max_chars)
            parts, kept = [], 0
    if parts:
        yield _clip("".join(parts).strip(), max_chars)


def _read_json_lines(path: Path, text_field: str, max_chars: int | None) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MoECompressError(f"{path}:{number} is not valid JSON ({exc}); each line must be one JSON object.") from None
            if not isinstance(record, dict):
                raise MoECompressError(
                    f"{path}:{number} is a JSON {_kind(record)}, not an object; each line must be an object like "
                    f'{{"{text_field}": "..."}}.'
                )
            if text_field not in record:
                raise MoECompressError(f"{path}:{number} has no field {text_field!r}; set {param('text_field')}.")
            text = record[text_field]
            if not isinstance(text, str):
                raise MoECompressError(
                    f"{path}:{number}: field {text_field!r} is {_kind(text)}, not a string; fix or remove that line."
                )
            yield _clip(text, max_chars)


def _read_parquet(path: Path, text_field: str, max_chars: int | None) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        columns = handle.schema_arrow.names
        if text_field not in columns:
            raise MoECompressError(f"{path} has no column {text_field!r} (columns: {columns}); set {param('text_field')}.")
        for batch in handle.iter_batches(columns=[text_field], batch_size=256):
            for value in batch.column(0).to_pylist():
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise MoECompressError(f"{path}: column {text_field!r} holds {_kind(value)} values, not strings; set {param('text_field')}.")
                yield _clip(value, max_chars)
    except (pa.ArrowException, OSError) as exc:
        raise MoECompressError(f"{path} is not a readable parquet file ({str(exc).splitlines()[0]}).") from None


def _read_file(path: Path, text_field: str, max_chars: int | None = None) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise MoECompressError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(TEXT_SUFFIXES)}.")
    try:
        if suffix in (".txt", ".md"):
            yield from _read_paragraphs(path, max_chars)
        elif suffix in (".jsonl", ".json"):
            yield from _read_json_lines(path, text_field, max_chars)
        else:
            yield from _read_parquet(path, text_field, max_chars)
    except UnicodeDecodeError as exc:
        raise MoECompressError(f"cannot read text from {path}: it is not UTF-8 ({exc.reason} at byte {exc.start}).") from None


def _read_bundled(spec: str, split: str, max_chars: int | None) -> Iterator[str]:
    domains = spec.partition(":")[2].split(",") if ":" in spec else bundled_domains()
    if not domains:
        raise MoECompressError("no bundled data is installed with this copy of moe-compress; pass a file or directory.")
    paths = []
    for domain in domains:
        path = BUNDLED_DATA / domain / f"{split}.jsonl"
        if not path.is_file():
            raise MoECompressError(f"no bundled {split!r} data for domain {domain!r}; domains: {', '.join(bundled_domains())}.")
        paths.append(path)
    for path in paths:
        yield from _read_file(path, "text", max_chars)


def _read_hub(spec: str, text_field: str, max_chars: int | None) -> Iterator[str]:
    name, _, split = spec.removeprefix("hf:").partition("@")
    name, _, subset = name.partition(":")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise MoECompressError(
            f"dataset {name!r} must be downloaded from the Hugging Face Hub, but offline mode is set "
            "(HF_HUB_OFFLINE). Save it locally as .jsonl/.parquet and pass that path instead."
        )
    try:
        import datasets

        dataset = datasets.load_dataset(name, subset or None, split=split or "train", streaming=True)
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise MoECompressError(f"could not load dataset {name!r} from the Hub: {exc}") from None
    for record in dataset:
        if text_field not in record:
            raise MoECompressError(f"dataset {name!r} has no column {text_field!r} (columns: {sorted(record)}).")
        if isinstance(record[text_field], str):
            yield _clip(record[text_field], max_chars)


def iter_documents(source: str | Path, text_field: str = "text", split: str = "calib", max_chars: int | None = None) -> Iterator[str]:
    """Non-empty documents of `source` in order, each cut to `max_chars` (see the module docstring)."""
    spec = str(source)
    if spec == "bundled" or spec.startswith("bundled:"):
        documents = _read_bundled(spec, split, max_chars)
    elif spec.startswith("hf:"):
        documents = _read_hub(spec, text_field, max_chars)
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
            if not files:
                raise MoECompressError(f"directory {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}).")
            documents = (t for f in files for t in _read_file(f, text_field, max_chars))
        elif path.is_file():
            documents = _read_file(path, text_field, max_chars)
        else:
            raise MoECompressError(
                f"calibration source {spec!r} not found: pass a file, a directory, 'bundled', or 'hf:<dataset>'."
            )
    found = False
    for text in documents:
        if text.strip():
            found = True
            yield text
    if not found:
        raise MoECompressError(f"calibration source {spec!r} contains no text.")


def load_texts(source: str | Path, text_field: str = "text", split: str = "calib") -> list[str]:
    """All non-empty documents of `source` (see module docstring for the forms it takes)."""
    return list(iter_documents(source, text_field, split))
