"""What a checkpoint states against what it holds: a top-k left to the config class's default is
said aloud, and --verify-checksums checks a Hugging Face cache snapshot's files against the
sha256 their blobs are named by (refusals of bad inputs are in test_bad_inputs)."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from moe_compress.cli import app
from tiny_checkpoints import save_tiny_checkpoint

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
