"""`inspect` from config.json and the shard headers alone (issue 24: start-up): the same report as the
modelling code, and the modelling code wherever the headers cannot vouch for the answer (that it
imports neither torch nor transformers: tests/test_startup.py)."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moe_compress.cli import app
from moe_compress import listings
from moe_compress.source.header_report import structure_from_headers
from moe_compress.source.key_layout import known_layout
from tiny_checkpoints import save_tiny_checkpoint

runner = CliRunner()
#: Routed experts stored per expert (mixtral, deepseek_v3) or fused 3-D with biases (gpt_oss); shared
#: experts with a gate (qwen2_moe); dense first layers (deepseek_v3); Mamba layers without attention
#: (granitemoehybrid); rotary sizes from qk_rope_head_dim (deepseek_v3) or head_dim.
FAMILIES = ("mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss", "granitemoehybrid")


def inspect(*args) -> str:
    result = runner.invoke(app, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def from_headers(directory) -> dict | None:
    """`structure_from_headers`, as the JSON `inspect --json` prints (layer numbers become strings)."""
    return json.loads(json.dumps(structure_from_headers(str(directory)), default=str))


def without_modelling_code(monkeypatch) -> None:
    def refuse(*_args):
        raise AssertionError("inspect used the modelling code")

    monkeypatch.setattr(listings, "_with_modelling_code", refuse)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_tiny_checkpoint(root / family, family) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_headers_give_the_modelling_codes_report(family, checkpoints, monkeypatch):
    directory = checkpoints[family]
    learned = inspect(directory, "--json")  # the first checkpoint of the family: the modelling code, which learns its layout
    tables = inspect(directory)
    assert known_layout(family) is not None
    without_modelling_code(monkeypatch)
    assert inspect(directory, "--json") == learned
    assert inspect(directory) == tables
    assert from_headers(directory) == json.loads(learned)


def _rewrite_config(directory, **changes):
    config = {**json.loads((directory / "config.json").read_text()), **changes}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def test_what_the_headers_cannot_vouch_for_goes_to_the_modelling_code(checkpoints, tmp_path):
    inspect(checkpoints["mixtral"], "--json")
    assert structure_from_headers(str(checkpoints["mixtral"])) is not None

    def variant(name):
        return shutil.copytree(checkpoints["mixtral"], tmp_path / name)

    fewer = variant("fewer-experts")  # the config's expert count is not the router's: the modelling code names the mismatch
    _rewrite_config(fewer, num_local_experts=4)
    unstated = variant("no-top-k")  # top-k left to the config class's default: the modelling code warns
    _rewrite_config(unstated, num_experts_per_tok=None)
    coded = variant("tokenizer-code")  # code that would run: refused or trusted by the modelling path only
    (coded / "tokenizer_config.json").write_text(json.dumps({**json.loads((coded / "tokenizer_config.json").read_text()),
                                                             "auto_map": {"AutoTokenizer": ["tok.Tok", None]}}))
    extra = variant("unknown-key")  # a tensor the learned layout does not know
    tensors = load_file(extra / "model.safetensors")
    save_file({**tensors, "model.layers.0.block_sparse_moe.odd.weight": tensors["model.norm.weight"].clone()}, extra / "model.safetensors",
              metadata={"format": "pt"})
    integers = variant("integer-norm")  # a weight stored as integers: `source.sanity` refuses it
    save_file({**tensors, "model.norm.weight": tensors["model.norm.weight"].int()}, integers / "model.safetensors", metadata={"format": "pt"})
    for directory in (fewer, unstated, coded, extra, integers):
        assert structure_from_headers(str(directory)) is None, directory.name
    assert structure_from_headers("org/not-local") is None


def test_a_second_checkpoint_of_the_family_adds_its_keys(checkpoints, tmp_path, monkeypatch):
    """ref-mixtral ties its output embeddings to its input ones (no lm_head key); the tiny one stores them apart.
    A config that ties them although the shard stores both counts them once, as transformers ties them."""
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(tmp_path / "cache"))
    tied = inspect("ref-mixtral", "--json")
    assert structure_from_headers(str(checkpoints["mixtral"])) is None  # lm_head.weight: a key the layout does not know yet
    untied = json.loads(inspect(checkpoints["mixtral"], "--json"))
    retied = shutil.copytree(checkpoints["mixtral"], tmp_path / "retied")
    _rewrite_config(retied, tie_word_embeddings=True)
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(tmp_path / "other-cache"))
    expected = json.loads(inspect(retied, "--json"))  # the modelling code: nothing learned in this cache
    assert untied["size"]["other"] - expected["size"]["other"] == load_file(retied / "model.safetensors")["lm_head.weight"].numel()
    monkeypatch.setenv("MOE_COMPRESS_CACHE", str(tmp_path / "cache"))
    without_modelling_code(monkeypatch)
    assert from_headers(checkpoints["mixtral"]) == untied
    assert from_headers(retied) == expected
    assert inspect("ref-mixtral", "--json") == tied
