"""What a checkpoint states against what it holds: a top-k left to the config class's default is
said aloud, and --verify-checksums checks a Hugging Face cache snapshot's files against the
sha256 their blobs are named by (refusals of bad inputs are in test_bad_inputs)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from moe_compress.cli import app
from moe_compress.source.verify import verify_checksums
from tiny_checkpoints import hub_cache_snapshot, save_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("integrity") / "tiny")


def test_a_top_k_left_to_the_config_class_default_is_said_aloud(checkpoint, tmp_path):
    """Mixtral's config class defaults to top-2, which transformers then runs: used, with a warning naming the key."""
    directory = shutil.copytree(checkpoint, tmp_path / "no-top-k")
    config = json.loads((directory / "config.json").read_text())
    del config["num_experts_per_tok"]
    (directory / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["inspect", str(directory), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top_k"] == 2
    assert result.stderr.count("warning:") == 1
    assert "config.json does not state top-k ('num_experts_per_tok'); using MixtralConfig's default, 2, as transformers does" in result.stderr
    stated = runner.invoke(app, ["inspect", str(checkpoint), "--json"])
    assert stated.exit_code == 0 and "warning" not in stated.stderr


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_verify_checksums_passes_an_intact_hub_snapshot_and_names_a_damaged_file(checkpoint, tmp_path):
    snapshot = hub_cache_snapshot(checkpoint, tmp_path / "models--org--tiny")
    intact = runner.invoke(app, ["inspect", str(snapshot), "--verify-checksums", "--json"])
    assert intact.exit_code == 0, intact.output
    assert json.loads(intact.stdout)["model_type"] == "mixtral"
    assert sorted(p.name for p in verify_checksums(snapshot)) == sorted(p.name for p in checkpoint.iterdir())
    _flip_last_byte((snapshot / "config.json").resolve())  # a trailing newline: still valid JSON, another git sha1
    damaged = runner.invoke(app, ["inspect", str(snapshot), "--verify-checksums"])
    assert damaged.exit_code == 2
    assert re.fullmatch(r"error: config\.json of \S+ does not match the git-sha1 its Hugging Face cache records .*\n", damaged.stderr)


def test_without_the_option_a_flipped_weight_bit_loads(checkpoint, tmp_path):
    """What --help and the README say is not checked by default: the bits of a finite weight."""
    snapshot = hub_cache_snapshot(checkpoint, tmp_path / "models--org--tiny")
    _flip_last_byte((snapshot / "model.safetensors").resolve())
    assert runner.invoke(app, ["inspect", str(snapshot)]).exit_code == 0
    verified = runner.invoke(app, ["inspect", str(snapshot), "--verify-checksums"])
    assert verified.exit_code == 2 and verified.stderr.startswith("error: model.safetensors of ") and "does not match the sha256" in verified.stderr
