"""Tables derived from this package's code and the installed transformers, built once and kept.

`moe-compress families` imports the modelling code of every MoE family transformers ships, and
`moe-compress methods` imports every method (torch with them), only to print what the code
says about itself. Those tables depend on nothing else, so they are stored under the cache root
keyed by the moe-compress version, the transformers version and a digest of this package's
sources (an edited method or refusal is never answered by an old table). An entry also records
a digest of its rows and is used only when key and digest both match; anything else -- another
key, edited rows, unreadable JSON -- is rebuilt. Reading an entry imports neither torch nor
transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from . import __version__
from .errors import warn
from .paths import cache_root

Rows = list[dict]
PACKAGE = Path(__file__).parent


def code_key() -> dict[str, str]:
    """What a derived table depends on: this package's sources and the transformers installed."""
    code = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        code.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {"transformers": version("transformers"), "moe_compress": __version__, "code": code.hexdigest()}


def _digest(rows: Rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _read(path: Path, key: dict[str, str]) -> Rows | None:
    try:
        entry = json.loads(path.read_text())
        return entry["rows"] if entry["key"] == key and entry["digest"] == _digest(entry["rows"]) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, key: dict[str, str], rows: Rows) -> None:
    partial = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"key": key, "digest": _digest(rows), "rows": rows}, indent=1) + "\n")
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        warn(f"could not store the {path.parent.name} table under {path.parent} ({exc.strerror or exc}); it is rebuilt next time.")


def _path(name: str, key: dict[str, str]) -> Path:
    return cache_root() / name / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"


def recall(name: str) -> Rows | None:
    """The rows kept under `name` for this code and transformers, or None (nothing is built)."""
    key = code_key()
    return _read(_path(name, key), key)


def remember(name: str, rows: Rows) -> None:
    """Keep `rows` under `name` for this code and transformers (a warning, not an error, where it cannot)."""
    key = code_key()
    _write(_path(name, key), key, rows)


def remembered(name: str, build: Callable[[], Rows], refresh: bool = False) -> Rows:
    """The rows `build` returns for this code and transformers: read back if stored, else built and stored."""
    rows = None if refresh else recall(name)
    if rows is None:
        rows = build()
        remember(name, rows)
    return rows
