"""The families table as data, remembered per installed transformers and moe-compress code.

Building the table (`table.compute_family_rows`) imports the modelling code of every MoE family
transformers ships and builds each on the meta device: tens of seconds. The rows depend only on
the installed transformers and on this package's architecture code, so they are stored once
under the cache root, keyed by both: the transformers version, the moe-compress version and a
digest of the `arch` sources (so an edited adapter or refusal is never answered by an old
table). An entry also records a digest of its rows and is used only when both match; anything
else -- another key, edited rows, unreadable JSON -- is rebuilt. Reading an entry imports neither
torch nor transformers, so `moe-compress families` answers in well under a second once built.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from .. import __version__
from ..errors import warn
from ..paths import cache_root

_SOURCES = Path(__file__).parent


@dataclass(frozen=True)
class FamilyRow:
    model_type: str
    supported: bool
    reason: str = ""  # why not, when refused
    router: str = ""
    shared_experts: str = ""
    outputs: str = ""
    notes: str = ""


def table_key() -> dict[str, str]:
    """What the rows depend on: the transformers that is installed and the code that reads it."""
    code = hashlib.sha256()
    for path in sorted([*_SOURCES.glob("*.py"), _SOURCES.parent / "errors.py"]):
        code.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"transformers": version("transformers"), "moe_compress": __version__, "code": code.hexdigest()}


def _rows_digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def _entry_path(key: dict[str, str]) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "families" / f"{name}.json"


def _read(path: Path, key: dict[str, str]) -> list[FamilyRow] | None:
    try:
        entry = json.loads(path.read_text())
        if entry["key"] != key or entry["digest"] != _rows_digest(entry["rows"]):
            return None
        return [FamilyRow(**row) for row in entry["rows"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, key: dict[str, str], rows: list[FamilyRow]) -> None:
    data = [asdict(row) for row in rows]
    partial = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"key": key, "digest": _rows_digest(data), "rows": data}, indent=1) + "\n")
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        warn(f"could not store the families table under {path.parent} ({exc.strerror or exc}); it is rebuilt next time.")


def family_rows(refresh: bool = False) -> list[FamilyRow]:
    """Every MoE model type of the installed transformers, as discovery sees it (cached; see above)."""
    key = table_key()
    path = _entry_path(key)
    rows = None if refresh else _read(path, key)
    if rows is None:
        from .table import compute_family_rows

        rows = compute_family_rows()
        _write(path, key, rows)
    return rows


def markdown(rows: list[FamilyRow]) -> str:
    lines = ["| model type | supported | router | shared experts | stock-loadable outputs | notes |", "|---|---|---|---|---|---|"]
    for row in rows:
        status = "yes" if row.supported else f"no: {row.reason}"
        cells = [f"`{row.model_type}`", status, row.router, row.shared_experts, row.outputs, row.notes]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
