"""Library errors name the API parameter; the CLI names the same parameter by its command's flag.

A Python caller who passes `bits=3` must read "bits must be 4 or 8", not a flag they never typed;
the CLI user who typed `--bits 3` reads "--bits must be 4 or 8" (`errors.param`, `cli.common.flag_of`).
"""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moe_compress
from moe_compress.cli import app
from moe_compress.data.batches import CalibrationSpec
from moe_compress.errors import MoECompressError, OptionError, param, warn
from moe_compress.evaluate.protocol import EvalProtocol
from moe_compress.inputs import writable_file
from moe_compress.methods.budget import check_ratio
from moe_compress.slimming.quantize import check_quantize_options
from tiny_checkpoints import save_tiny_checkpoint, write_calibration

runner = CliRunner()


class _Positions:
    max_position_embeddings = 128


# (what a Python caller does wrong, the parameter at fault, the line it reads)
PYTHON_CASES = {
    "ratio": (lambda tmp: check_ratio(1.5), "ratio", "ratio must be in [0, 1): the fraction of routed experts to remove; got 1.5."),
    "bits": (lambda tmp: check_quantize_options(3, "experts", "rtn", None), "bits", "bits must be 4 or 8; got 3."),
    "group_size": (lambda tmp: check_quantize_options(4, "experts", "rtn", -1), "group_size",
                   "group_size must be >= 0 (0: one scale per output row); got -1."),
    "plan_out": (lambda tmp: writable_file(tmp / "nowhere" / "plan.json", "plan_out"), "plan_out",
                 "plan_out {tmp}/nowhere/plan.json: directory {tmp}/nowhere does not exist; create it or choose another path."),
    "samples": (lambda tmp: CalibrationSpec(samples=0).validate(), "samples", "samples must be a positive integer; got 0."),
    "eval windows": (lambda tmp: EvalProtocol(0, 32).validate(), "protocol.windows", "protocol.windows must be a positive integer; got 0."),
    "eval seq_len": (lambda tmp: EvalProtocol(4, 4096).windows_of(object(), "bundled", _Positions()),
                     "protocol.seq_len", "protocol.seq_len 4096 is longer than the model's 128 positions (max_position_embeddings); "
                     "results past them are meaningless. Use protocol.seq_len 128 or less."),
}


@pytest.mark.parametrize("name", list(PYTHON_CASES))
def test_python_callers_read_the_api_parameter(name, tmp_path):
    call, parameter, line = PYTHON_CASES[name]
    with pytest.raises(moe_compress.OptionError) as caught:
        call(tmp_path)
    error = caught.value
    assert error.parameter == parameter
    assert str(error) == line.format(tmp=tmp_path)
    assert "--" not in str(error)


def test_a_quantize_stage_names_its_field():
    with pytest.raises(OptionError, match=r"^bits must be 4 or 8; got 3\.$"):
        moe_compress.Quantize(bits=3).check(None, [])


def test_messages_name_other_parameters_and_survive_wrapping_and_pickling(capsys):
    error = OptionError("method", f"autoround needs a group size (AutoRound tunes per group); pass {param('group_size')}.")
    assert str(error) == "method autoround needs a group size (AutoRound tunes per group); pass group_size."
    assert str(MoECompressError(f"stage 2 (quantize): {error}")) == "stage 2 (quantize): " + str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.parameter, copy.problem, str(copy)) == (error.parameter, error.problem, str(error))
    warn(f"applied with {param('ignore_plan_identity')}")
    assert capsys.readouterr().err == "warning: applied with ignore_plan_identity\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("option-errors")
    return save_tiny_checkpoint(root / "tiny"), write_calibration(root / "calib.jsonl", documents=40)


# the same mistakes on the command line: each names the command's flag, on one line, exit 2
CLI_CASES = {
    "ratio": (lambda m, c, out: ["prune", m, "--ratio", "1.5", "--out", out],
              "--ratio must be in [0, 1): the fraction of routed experts to remove; got 1.5."),
    "bits": (lambda m, c, out: ["quantize", m, "--bits", "3", "--out", out], "--bits must be 4 or 8; got 3."),
    "group_size": (lambda m, c, out: ["quantize", m, "--group-size", "-1", "--out", out],
                   "--group-size must be >= 0 (0: one scale per output row); got -1."),
    "plan_out": (lambda m, c, out: ["prune", m, "--out", out, "--plan-out", out.parent / "nowhere" / "plan.json"],
                 "--plan-out {tmp}/nowhere/plan.json: directory {tmp}/nowhere does not exist; create it or choose another path."),
    "samples": (lambda m, c, out: ["prune", m, "--samples", "0", "--out", out], "--samples must be a positive integer; got 0."),
    "eval windows": (lambda m, c, out: ["prune", m, "--eval", c, "--eval-windows", "0", "--out", out],
                     "--eval-windows must be a positive integer; got 0."),
    "eval seq_len (prune)": (lambda m, c, out: ["prune", m, "--eval", c, "--eval-seq-len", "4096", "--calib", c, "--seq-len", "32", "--out", out],
                             "--eval-seq-len 4096 is longer than the model's 128 positions (max_position_embeddings); "
                             "results past them are meaningless. Use --eval-seq-len 128 or less."),
    "eval seq_len (eval)": (lambda m, c, out: ["eval", m, "--ppl", c, "--seq-len", "4096", "--json", out.parent / "r.json"],
                            "--seq-len 4096 is longer than the model's 128 positions (max_position_embeddings); "
                            "results past them are meaningless. Use --seq-len 128 or less."),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_the_cli_names_its_flag_for_the_same_mistake(name, inputs, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    build, line = CLI_CASES[name]
    out = tmp_path / "out"
    result = runner.invoke(app, [str(a) for a in build(*inputs, out)])
    lines = [text for text in result.stderr.splitlines() if text.strip()]
    assert result.exit_code == 2, result.output
    assert lines == ["error: " + line.format(tmp=tmp_path)]
    assert not out.exists()


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LIBRARY = Path(moe_compress.__file__).parent
#: Flags the library may still quote (outside `cli/`), each with why.
ALLOWED = {
    # the guard's own threshold option: that module belongs to the guard's work (only its unreached-experts hint moved to param)
    ("evaluate/guard.py", "--guard-min-top1"),
    # a negated flag: the CLI's --no-speed is Python's speed=None, no one name serves both
    ("evaluate/models.py", "--no-speed"),
    # the task generator's own argparse command line (python -m moe_compress.evaluate.mc_tasks) and its lm_eval hint
    ("evaluate/mc_tasks.py", "--out"), ("evaluate/mc_tasks.py", "--items"), ("evaluate/mc_tasks.py", "--seed"), ("evaluate/mc_tasks.py", "--include"),
    # fitting.memory's own argparse command line
    ("fitting/memory.py", "--batch"), ("fitting/memory.py", "--context"),
    # the hint to run a checkpoint's own code names both spellings itself (the flag and the Python keyword)
    ("source/load.py", "--trust-remote-code"),
    # a command of another tool (huggingface-cli download --force-download)
    ("source/verify.py", "--force-download"),
    # whole moe-compress command lines to run (`moe-compress drop --unit moe`, `moe-compress run --help`)
    ("preflight.py", "--unit"), ("recipes.py", "--help"),
    # the verbosity flags the CLI's own argument parsing takes out of argv
    ("progress.py", "--quiet"), ("progress.py", "--verbose"),
    # what commands print (reports and listings of the CLI), and model-card lines naming a command to run
    ("report/compression.py", "--eval"), ("report/compression.py", "--ppl"), ("report/compression.py", "--compare"),
    ("report/tables.py", "--method"), ("report/tables.py", "--option"), ("sink/model_card.py", "--ppl"), ("sink/model_card.py", "--compare"),
}


def _quoted_flags(root: Path) -> set[tuple[str, str]]:
    """(module, flag) for every string literal of the library outside `cli/` that quotes a flag (docstrings aside)."""
    found = set()
    for path in sorted(root.rglob("*.py")):
        module = path.relative_to(root).as_posix()
        if module.startswith("cli/"):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found |= {(module, flag) for flag in FLAG.findall(node.value)}
    return found


def test_the_library_quotes_no_cli_flag_outside_the_allow_list():
    assert _quoted_flags(LIBRARY) - ALLOWED == set(), "name parameters with errors.param(api_name); the CLI shows its flag"


def test_the_scan_finds_a_flag_in_a_message(tmp_path):
    (tmp_path / "bad.py").write_text('def f(x):\n    """--docstrings are fine"""\n    raise ValueError(f"--bits must be 4; got {x}")\n')
    assert _quoted_flags(tmp_path) == {("bad.py", "--bits")}
