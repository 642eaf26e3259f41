"""Registries refuse a name twice: a silent overwrite would change what a saved plan or a recipe
naming it means."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_compress.methods import METHODS
from moe_compress.methods.registry import register
from moe_compress.recipes import STAGES, register_stage


def test_registering_a_method_name_twice_is_an_error():
    reap = METHODS["reap"]
    with pytest.raises(ValueError, match="'reap' is already registered"):
        register(replace(reap, doc="an impostor"))
    assert METHODS["reap"] is reap


def test_registering_a_stage_name_twice_is_an_error():
    prune = STAGES["prune"]
    with pytest.raises(ValueError, match="'prune' is already registered"):
        register_stage("prune", lambda ctx, options: None)
    assert STAGES["prune"] is prune
