"""`libraries.import_model_libraries`: torch and transformers' modelling code load with no collection of the
cyclic garbage collector meanwhile, what they made is frozen, and the collector is left as it was; where they are
imported already, nothing happens."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from moe_compress.libraries import import_model_libraries

PROBE = """
import gc, sys
from moe_compress.libraries import import_model_libraries
assert "torch" not in sys.modules
{before}
collections = []
gc.callbacks.append(lambda phase, info: phase == "stop" and collections.append(info["generation"]))
import_model_libraries()
assert "torch" in sys.modules and "transformers.modeling_utils" in sys.modules
assert gc.isenabled() == {enabled} and collections == [], collections
assert gc.get_freeze_count() > 100_000, gc.get_freeze_count()
"""


@pytest.mark.parametrize("before, enabled", [("", True), ("gc.disable()", False)])
def test_the_libraries_load_without_a_collection_and_what_they_made_is_frozen(before, enabled):
    run = subprocess.run([sys.executable, "-c", PROBE.format(before=before, enabled=enabled)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_where_they_are_imported_already_nothing_is_frozen():
    import transformers.modeling_utils  # noqa: F401

    frozen = gc.get_freeze_count()
    import_model_libraries()
    assert gc.get_freeze_count() == frozen and gc.isenabled()
