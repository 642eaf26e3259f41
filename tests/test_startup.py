"""Commands that only read tables answer without importing torch: `families` from its cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moe_compress.arch import family_table, table
from moe_compress.arch.family_table import FamilyRow, family_rows

FAKE = [FamilyRow("fake_moe", True, router="softmax", outputs="uniform prune"), FamilyRow("other", False, "a reason")]


@pytest.fixture
def built(monkeypatch, tmp_path):
    """A cache root of its own, and a table build that counts its calls instead of importing 65 families."""
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(table, "compute_family_rows", lambda: calls.append(1) or list(FAKE))
    return calls


def test_the_families_table_is_built_once_and_read_back_without_torch(built, tmp_path):
    assert family_rows() == FAKE and family_rows() == FAKE
    assert len(built) == 1
    probe = (
        "import sys\nfrom moe_compress.cli import main\nsys.argv = ['moe-compress', 'families', '--markdown']\n"
        "try:\n    main()\nexcept SystemExit as end:\n    assert not end.code, end.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MOE_COMPRESS_CACHE": str(tmp_path)})
    assert run.returncode == 0, run.stderr
    assert run.stdout == family_table.markdown(FAKE)


def test_an_edited_or_foreign_entry_is_rebuilt(built, monkeypatch):
    family_rows()
    (entry,) = (family_table.cache_root() / "families").glob("*.json")
    data = json.loads(entry.read_text())
    data["rows"][1]["supported"] = True  # the digest still describes the rows as built
    entry.write_text(json.dumps(data))
    assert family_rows() == FAKE and len(built) == 2
    monkeypatch.setattr(family_table, "table_key", lambda: {**data["key"], "transformers": "0.0.0"})
    assert family_rows() == FAKE and len(built) == 3


def test_the_key_follows_the_architecture_code(monkeypatch, tmp_path):
    before = family_table.table_key()
    code = tmp_path / "arch"
    code.mkdir()
    for path in family_table._SOURCES.glob("*.py"):
        (code / path.name).write_bytes(path.read_bytes())
    (tmp_path / "errors.py").write_bytes((family_table._SOURCES.parent / "errors.py").read_bytes())
    monkeypatch.setattr(family_table, "_SOURCES", code)
    assert family_table.table_key() == before
    (code / "families.py").write_text((code / "families.py").read_text() + "\n# an edited refusal\n")
    assert family_table.table_key()["code"] != before["code"]
