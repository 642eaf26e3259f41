"""Registries refuse a name twice: a silent overwrite would change what a saved plan or a recipe
naming it means."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_compress.methods import METHODS
from moe_compress.methods.registry import register
from moe_compress.stages import Prune, register_stage, stages


def test_registering_a_method_name_twice_is_an_error():
    reap = METHODS["reap"]
    with pytest.raises(ValueError, match="'reap' is already registered"):
        register(replace(reap, doc="an impostor"))
    assert METHODS["reap"] is reap


def test_registering_a_stage_name_twice_is_an_error():
    class Impostor(Prune):
        """Claims the built-in name."""

    with pytest.raises(ValueError, match="'prune' is already registered"):
        register_stage(Impostor)
    assert stages()["prune"] is Prune
