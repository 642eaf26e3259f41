"""The checks `analyze` and `eval` run before loading a model live in the library: a Python caller gets the
same refusal, naming the API parameter, that the command line gives naming its flag."""

from __future__ import annotations

import errno

import pytest
from typer.testing import CliRunner

from moe_compress import progress
from moe_compress.analyze import AnalysisSettings, analyze_checkpoint
from moe_compress.cli import app
from moe_compress.data.batches import CalibrationSpec
from moe_compress.errors import MoECompressError, OptionError, user_message
from moe_compress.evaluate.models import Evaluation
from moe_compress.evaluate.protocol import EvalProtocol
from moe_compress.evaluate.speed import SpeedSettings
from tiny_checkpoints import save_tiny_checkpoint

runner = CliRunner()

# (a request made wrongly, the parameter at fault, the line it reads)
LIBRARY_CASES = {
    "clusters": (lambda out: AnalysisSettings(out, clusters=0), "clusters", "clusters must be a positive integer; got 0."),
    "normalize": (lambda out: AnalysisSettings(out, normalize="log"), "normalize", "normalize must be none or layer; got 'log'."),
    "ratio": (lambda out: AnalysisSettings(out, method="reap", ratio=1.5), "ratio",
              "ratio must be in [0, 1): the fraction of routed experts to remove; got 1.5."),
    "calibration": (lambda out: AnalysisSettings(out, CalibrationSpec(samples=0)), "samples", "samples must be a positive integer; got 0."),
    "batch_size": (lambda out: Evaluation("m", batch_size=0), "batch_size", "batch_size must be a positive integer; got 0."),
    "limit": (lambda out: Evaluation("m", limit=0), "limit", "limit must be a positive integer; got 0."),
    "protocol": (lambda out: Evaluation("m", protocol=EvalProtocol(0, 32)), "protocol.windows", "protocol.windows must be a positive integer; got 0."),
    "speed": (lambda out: SpeedSettings(prompt_len=0), "speed.prompt_len", "speed.prompt_len must be a positive integer; got 0."),
}


@pytest.mark.parametrize("name", list(LIBRARY_CASES))
def test_library_requests_check_their_values_when_made(name, tmp_path):
    make, parameter, line = LIBRARY_CASES[name]
    with pytest.raises(OptionError) as caught:
        make(tmp_path / "analysis")
    assert (caught.value.parameter, str(caught.value)) == (parameter, line)


def test_analyze_checkpoint_refuses_a_plan_and_a_method_before_reading_the_model(tmp_path):
    with pytest.raises(MoECompressError, match=r"^give plan or method, not both\.$"):
        analyze_checkpoint("no-such-model", AnalysisSettings(tmp_path / "analysis", method="reap"), plan=tmp_path / "plan.json")
    assert not (tmp_path / "analysis").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli-checks") / "tiny")


CLI_CASES = {
    "normalize": (["analyze", "--normalize", "log"], "error: --normalize must be none or layer; got 'log'."),
    "plan and method": (["analyze", "--plan", "plan.json", "--method", "reap"], "error: give --plan or --method, not both."),
    "speed batch": (["eval", "--speed-batch", "0"], "error: --speed-batch must be a positive integer; got 0."),
    "windows": (["eval", "--max-windows", "0"], "error: --max-windows must be a positive integer; got 0."),
    "limit": (["eval", "--limit", "0"], "error: --limit must be a positive integer; got 0."),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_the_commands_name_their_flags_for_the_library_checks(name, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COLUMNS", raising=False)
    (command, *options), line = CLI_CASES[name]
    out = ["--out", str(tmp_path / "analysis")] if command == "analyze" else []
    result = runner.invoke(app, [command, str(tiny), *options, *out])
    assert result.exit_code == 2, result.output
    assert [text for text in result.stderr.splitlines() if text.strip()] == [line]
    assert not (tmp_path / "analysis").exists()


def test_user_message_is_one_line_for_what_the_user_caused_and_none_for_a_bug():
    assert user_message(MoECompressError("ratio must be in [0, 1).")) == "ratio must be in [0, 1)."
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out")
    assert user_message(full) == "No space left on device: /data/out; check the path, its permissions and free space."
    assert user_message(OSError(errno.EBADF, "Bad file descriptor")) is None
    assert user_message(ValueError("a bug")) is None


def test_verbosity_set_restores_the_previous_setting():
    before = progress.set_verbosity("verbose")
    try:
        with progress.verbosity_set("quiet"):
            assert progress.verbosity() == "quiet"
        assert progress.verbosity() == "verbose"
        with progress.verbosity_set(None):
            assert progress.verbosity() == "verbose"
    finally:
        progress.set_verbosity(before)
