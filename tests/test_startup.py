"""Commands that only print what the code says about itself answer without importing torch:
`families` and `methods` read back the table they built once (`remembered`), `inspect` reads
config.json and the shard headers with its family's key layout (`source.key_layout`)."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

from moe_compress import remembered
from moe_compress.arch import family_table, table
from moe_compress.arch.family_table import FamilyRow
from moe_compress.listings import family_rows

FAKE = [FamilyRow("fake_moe", True, router="softmax", outputs="uniform prune"), FamilyRow("other", False, "a reason")]
LIGHT = "\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n"


@pytest.fixture
def built(monkeypatch, tmp_path):
    """A cache root of its own, and a table build that counts its calls instead of importing 65 families."""
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(table, "compute_family_rows", lambda: calls.append(1) or list(FAKE))
    return calls


def _cli(tmp_path, *args: str, exit_code: int = 0) -> subprocess.CompletedProcess:
    """`moe-compress ARGS` in a fresh process that checks its exit code, then that torch and
    transformers were never imported."""
    probe = (f"import sys\nfrom moe_compress.cli import main\nsys.argv = ['moe-compress', *{list(args)!r}]\n"
             f"try:\n    main()\nexcept SystemExit as end:\n    assert (end.code or 0) == {exit_code}, end.code\n" + LIGHT)
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MOE_COMPRESS_CACHE": str(tmp_path), "COLUMNS": "200"})


def test_the_families_table_is_built_once_and_read_back_without_torch(built, tmp_path):
    assert family_rows() == FAKE and family_rows() == FAKE
    assert len(built) == 1
    run = _cli(tmp_path, "families", "--markdown")
    assert run.returncode == 0, run.stderr
    assert run.stdout == family_table.markdown(FAKE)


def test_methods_reads_back_what_its_first_call_built_without_torch(tmp_path):
    first = _cli(tmp_path, "methods")
    assert first.returncode != 0 and "heavy import" in first.stderr  # the first call imports every method
    again = _cli(tmp_path, "methods")
    assert again.returncode == 0, again.stderr
    assert "reap" in again.stdout and "quantize" in again.stdout


def test_an_edited_or_foreign_entry_is_rebuilt(built, monkeypatch):
    family_rows()
    (entry,) = (remembered.cache_root() / "families").glob("*.json")
    data = json.loads(entry.read_text())
    data["rows"][1]["supported"] = True  # the digest still describes the rows as built
    entry.write_text(json.dumps(data))
    assert family_rows() == FAKE and len(built) == 2
    monkeypatch.setattr(remembered, "code_key", lambda: {**data["key"], "transformers": "0.0.0"})
    assert family_rows() == FAKE and len(built) == 3


def test_the_key_follows_the_code(monkeypatch, tmp_path):
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "families.py").write_text("REFUSED = {}\n")
    monkeypatch.setattr(remembered, "PACKAGE", tmp_path)
    before = remembered.code_key()
    assert remembered.code_key() == before
    (tmp_path / "arch" / "families.py").write_text("REFUSED = {'x': 'an edited refusal'}\n")
    assert remembered.code_key()["code"] != before["code"]


def test_inspect_answers_from_the_headers_without_torch_once_the_family_is_learned(tmp_path):
    first = _cli(tmp_path, "inspect", "ref-mixtral", "--json")
    assert first.returncode != 0 and "heavy import" in first.stderr  # the family's first checkpoint: the modelling code
    again = _cli(tmp_path, "inspect", "ref-mixtral", "--json")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and json.loads(again.stdout)["size"]["total"] == 12_791_232
    assert _cli(tmp_path, "inspect", "ref-mixtral").returncode == 0


def test_a_model_that_cannot_be_found_is_answered_without_torch(tmp_path):
    run = _cli(tmp_path, "prune", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), exit_code=2)
    assert run.returncode == 0, run.stderr
    assert run.stderr.startswith("error: model") and "not found" in run.stderr
    assert not (tmp_path / "out").exists()


def test_importing_the_packages_imports_neither_torch_nor_transformers():
    probe = "import sys\nimport moe_compress, moe_compress.arch, moe_compress.evaluate, moe_compress.source, moe_compress.sink\n" + LIGHT
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("package", ["moe_compress", "moe_compress.arch", "moe_compress.evaluate", "moe_compress.source", "moe_compress.sink"])
def test_every_public_name_is_what_its_module_defines_even_once_every_submodule_is_imported(package):
    """A package's `__getattr__` only answers names it does not hold, and importing a submodule
    sets it as an attribute of its package: an export named like a submodule would be shadowed."""
    module = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert not submodules & set(module._EXPORTS) and set(module.__all__) <= set(module._EXPORTS)
    for name in module._EXPORTS:
        importlib.import_module(module._EXPORTS[name], package)
    for name in module._EXPORTS:
        assert getattr(module, name) is getattr(importlib.import_module(module._EXPORTS[name], package), name), name
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        module.no_such_name


def test_methods_name_reads_back_without_torch(tmp_path):
    _cli(tmp_path, "methods", "reap")  # the first call builds the options table (imports every method)
    again = _cli(tmp_path, "methods", "reap")
    assert again.returncode == 0, again.stderr
    assert "renormalize" in again.stdout and "protect_super_experts" in again.stdout
    unknown = _cli(tmp_path, "methods", "bogus", exit_code=2)
    assert unknown.returncode == 0, unknown.stderr
    assert unknown.stderr.startswith("error: unknown method 'bogus'")
