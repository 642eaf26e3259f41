"""A checkpoint's own Python code runs only with --trust-remote-code; our generated code is recognised.

The hostile checkpoints below ship modules that write a marker file when imported: the marker
proves whether their code ran. Each checkpoint directory has a unique name because
transformers names (and caches) dynamic modules after the directory's basename.
"""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from typer.testing import CliRunner

from helpers import token_batches
from moe_compress import MoECompressError, compress, load_model
from moe_compress.cli import app
from moe_compress.source.load import load_config
from tiny_checkpoints import save_tiny_checkpoint
from tiny_models import FAMILIES, tiny_model

runner = CliRunner()

_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("foreign code ran")
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

class EvilConfig(MixtralConfig):
    model_type = "mixtral"

class EvilModel(MixtralForCausalLM):
    config_class = MixtralConfig

class EvilConfiguredModel(MixtralForCausalLM):
    config_class = EvilConfig

class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("clean") / "tiny")


def _hostile(clean, tmp_path, path: str):
    """A copy of `clean` whose config, model class or tokenizer comes from a module that writes a marker."""
    directory = shutil.copytree(clean, tmp_path / f"hostile_{path}_{uuid.uuid4().hex[:8]}")
    marker = tmp_path / f"marker-{path}"
    module = f"evil_{uuid.uuid4().hex[:8]}"
    (directory / f"{module}.py").write_text(_MODULE.format(marker=str(marker)))
    if path == "tokenizer":
        config_file, auto_map = directory / "tokenizer_config.json", {"AutoTokenizer": [None, f"{module}.EvilTokenizer"]}
    else:
        config_file = directory / "config.json"
        auto_map = {"AutoModelForCausalLM": f"{module}.EvilModel"}
        if path == "config":
            auto_map = {"AutoConfig": f"{module}.EvilConfig", "AutoModelForCausalLM": f"{module}.EvilConfiguredModel"}
    config = json.loads(config_file.read_text())
    config["auto_map"] = auto_map
    config_file.write_text(json.dumps(config))
    return directory, marker


@pytest.mark.parametrize("path", ["config", "model", "tokenizer"])
def test_foreign_code_never_runs_without_the_flag(path, clean, tmp_path):
    checkpoint, marker = _hostile(clean, tmp_path, path)
    for command in (["inspect", checkpoint], ["prune", checkpoint, "--out", tmp_path / "out", "--calib", "bundled", "--seq-len", "32"],
                    ["eval", clean, "--compare", checkpoint]):
        result = runner.invoke(app, [str(a) for a in command])
        assert result.exit_code == 2, result.output
        assert "--trust-remote-code" in result.stderr and "it was not run" in result.stderr
        assert not marker.exists(), f"{path}: foreign code ran without --trust-remote-code ({command[0]})"
    assert not (tmp_path / "out").exists()
    with pytest.raises(MoECompressError, match="trust_remote_code=True"):
        load_model(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("path", ["config", "model", "tokenizer"])
def test_foreign_code_runs_with_the_flag(path, clean, tmp_path):
    checkpoint, marker = _hostile(clean, tmp_path, path)
    result = runner.invoke(app, ["inspect", str(checkpoint), "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    assert marker.read_text() == "foreign code ran"


def test_a_recipe_opts_in_with_its_own_key(clean, tmp_path):
    from moe_compress.recipes import load_recipe

    checkpoint, marker = _hostile(clean, tmp_path, "config")
    assert load_recipe({"model": "x", "trust_remote_code": True, "stages": [{"prune": {}}]})["trust_remote_code"] is True
    recipe = {"model": str(checkpoint), "stages": [{"prune": {"ratio": 0.25}}], "calibration": {"seq_len": 32, "samples": 2}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    result = runner.invoke(app, ["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and not marker.exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A non-uniform output of ours (novices): it carries generated remote code."""
    out = tmp_path_factory.mktemp("own") / "mone"
    compress(tiny_model("mixtral"), method="mone", ratio=0.5, budget="global", calib=token_batches(), out=out, cache_dir=False)
    return out


def test_our_generated_code_loads_without_the_flag(own):
    from moe_compress.source.remote_code import AUTO_MAP

    config = json.loads((own / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    model, _ = load_model(own)
    assert type(model).__name__.startswith("MoECompress")
    load_config(own)


@pytest.mark.parametrize("tamper", ["edit-runtime", "extra-module", "other-auto-map", "hub-reference"])
def test_tampered_generated_code_is_foreign(tamper, own, tmp_path):
    copy = shutil.copytree(own, tmp_path / f"tampered_{uuid.uuid4().hex[:8]}")
    config = json.loads((copy / "config.json").read_text())
    if tamper == "edit-runtime":
        runtime = copy / "moe_compress_runtime.py"
        runtime.write_text(runtime.read_text() + "\nimport os  # added\n")
    elif tamper == "extra-module":
        (copy / "helper.py").write_text("x = 1\n")
    elif tamper == "other-auto-map":
        config["auto_map"]["AutoModelForCausalLM"] = "moe_compress_runtime.ConstantRouter"
    else:
        config["auto_map"]["AutoConfig"] = "someone/repo--configuration_moe_compress.MoECompressConfig"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoECompressError, match="trust_remote_code=True"):
        load_model(copy)


def test_a_recorded_hash_cannot_vouch_for_edited_code(own, tmp_path):
    """Whatever the checkpoint claims about itself, only the bytes are compared."""
    copy = shutil.copytree(own, tmp_path / f"claims_{uuid.uuid4().hex[:8]}")
    config = json.loads((copy / "config.json").read_text())
    config["moe_compress"]["code_sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "modeling_moe_compress.py").write_text((copy / "modeling_moe_compress.py").read_text().replace("Needs only", "Needs"))
    with pytest.raises(MoECompressError, match="claims to be a moe-compress output"):
        load_model(copy)


@pytest.mark.parametrize("family", FAMILIES)
def test_recognised_class_names_are_the_ones_we_write(family):
    """Recognition rebuilds the files from transformers' registry; they must equal what saving writes."""
    from moe_compress.source.remote_code import _stock_class_name, expected_files, generated_files

    model = tiny_model(family, num_layers=2)
    written = generated_files(family, _stock_class_name(model.config), _stock_class_name(model))
    assert expected_files(family) == written
