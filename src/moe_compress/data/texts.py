"""Read documents from wherever calibration or evaluation text lives.

Sources, in the order they are tried:
  * ``bundled`` or ``bundled:<domain>[,<domain>]`` -- the project's own held-out text
    (``<split>`` file of each domain: calib, valid or test);
  * a local file: ``.txt``/``.md`` (documents separated by blank lines), ``.jsonl``/``.json``
    (one object per line, text under ``text_field``), ``.parquet`` (column ``text_field``);
  * a local directory: every such file below it, in sorted order;
  * ``hf:<dataset>[:<config>][@<split>]`` -- a Hugging Face dataset (needs network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import MoECompressError

BUNDLED_DATA = Path(__file__).resolve().parent.parent / "assets" / "data"
TEXT_SUFFIXES = {".txt", ".md", ".jsonl", ".json", ".parquet"}


def bundled_domains() -> list[str]:
    return sorted(p.name for p in BUNDLED_DATA.iterdir() if p.is_dir()) if BUNDLED_DATA.is_dir() else []


def _read_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".txt", ".md"):
            return [doc.strip() for doc in path.read_text(encoding="utf-8").split("\n\n") if doc.strip()]
        if suffix in (".jsonl", ".json"):
            texts = []
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if text_field not in record:
                        raise MoECompressError(f"{path}:{number} has no field {text_field!r}; set --text-field.")
                    texts.append(str(record[text_field]))
            return texts
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise MoECompressError(f"{path} has no column {text_field!r} (columns: {table.column_names}); set --text-field.")
            return [str(t) for t in table.column(text_field).to_pylist() if t]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MoECompressError(f"cannot read text from {path}: {exc}") from None
    raise MoECompressError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(TEXT_SUFFIXES)}.")


def _read_bundled(spec: str, split: str) -> list[str]:
    domains = spec.partition(":")[2].split(",") if ":" in spec else bundled_domains()
    if not domains:
        raise MoECompressError("no bundled data is installed with this copy of moe-compress; pass a file or directory.")
    texts = []
    for domain in domains:
        path = BUNDLED_DATA / domain / f"{split}.jsonl"
        if not path.is_file():
            raise MoECompressError(f"no bundled {split!r} data for domain {domain!r}; domains: {', '.join(bundled_domains())}.")
        texts += _read_file(path, "text")
    return texts


def _read_hub(spec: str, text_field: str) -> list[str]:
    name, _, split = spec.removeprefix("hf:").partition("@")
    name, _, subset = name.partition(":")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise MoECompressError(
            f"dataset {name!r} must be downloaded from the Hugging Face Hub, but offline mode is set "
            "(HF_HUB_OFFLINE). Save it locally as .jsonl/.parquet and pass that path instead."
        )
    try:
        import datasets

        dataset = datasets.load_dataset(name, subset or None, split=split or "train")
    except Exception as exc:  # the hub client raises many types; all mean "could not get it"
        raise MoECompressError(f"could not load dataset {name!r} from the Hub: {exc}") from None
    if text_field not in dataset.column_names:
        raise MoECompressError(f"dataset {name!r} has no column {text_field!r} (columns: {dataset.column_names}).")
    return [str(t) for t in dataset[text_field] if t]


def load_texts(source: str | Path, text_field: str = "text", split: str = "calib") -> list[str]:
    """All non-empty documents of `source` (see module docstring for the forms it takes)."""
    spec = str(source)
    if spec == "bundled" or spec.startswith("bundled:"):
        texts = _read_bundled(spec, split)
    elif spec.startswith("hf:"):
        texts = _read_hub(spec, text_field)
    else:
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
            if not files:
                raise MoECompressError(f"directory {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}).")
            texts = [t for f in files for t in _read_file(f, text_field)]
        elif path.is_file():
            texts = _read_file(path, text_field)
        else:
            raise MoECompressError(
                f"calibration source {spec!r} not found: pass a file, a directory, 'bundled', or 'hf:<dataset>'."
            )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise MoECompressError(f"calibration source {spec!r} contains no text.")
    return texts
