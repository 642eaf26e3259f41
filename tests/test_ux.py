"""A tool people enjoy (issue 15): one evaluation protocol, calibration once for many methods,
quiet and unwrapped output, outputs that say what they are, early failures and dry runs, and
the small things (--version, a light --help, `methods`, `inspect` from headers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.main import get_command
from typer.testing import CliRunner

from helpers import token_batches
from moe_compress import progress
from moe_compress.engine.statistics import collect_statistics
from moe_compress.cli import app
from moe_compress.evaluate.protocol import DEFAULT_PROTOCOL
from moe_compress.methods import METHODS
from tiny_checkpoints import save_tiny_checkpoint, write_calibration
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
#: a directory name long enough that any wrapping at 80 (or 200) columns would cut it
LONG = "output-" + "x" * 110


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("ux")
    return {
        "mixtral": save_tiny_checkpoint(root / "mixtral"),
        "deepseek": save_tiny_checkpoint(root / "deepseek", "deepseek_v3"),
        "calib": write_calibration(root / "calib.jsonl", documents=60),
        "root": root,
    }


def cli(*args, env: dict | None = None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    return result, result.stdout, result.stderr


def common(tiny) -> list:
    return ["--calib", tiny["calib"], "--samples", "8", "--seq-len", "32"]


@pytest.fixture(scope="module")
def pruned(tiny):
    """One uniform REAP prune with --eval into a directory with a very long name, shared by several tests."""
    out = tiny["root"] / LONG
    result, stdout, stderr = cli("prune", tiny["mixtral"], *common(tiny), "--eval", tiny["calib"], "--eval-seq-len", "32",
                                 "--plan-out", tiny["root"] / "plan.json", "--out", out, "--cache-dir", tiny["root"] / "cache")
    assert result.exit_code == 0, stdout + stderr
    return out, stdout


# ---- 2. one evaluation protocol --------------------------------------------------------------
def _default(command: str, option: str) -> int:
    """The default of `option` as the command defines it, checked to be what its --help shows."""
    params = {name: param for param in get_command(app).commands[command].params for name in param.opts}
    default = params[option].default
    lines = [line.strip("│ ") for line in runner.invoke(app, [command, "--help"]).stdout.splitlines()]
    start = next(i for i, line in enumerate(lines) if re.match(rf"{option}(,\S+)?\s+<int>", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"--?[\w-]+(,\S+)?\s{2,}", lines[i])), len(lines))
    shown = re.search(r"\[default:\s*(\d+)\]", " ".join(lines[start:end]))
    assert shown and int(shown.group(1)) == default, lines[start:end]
    return default


def test_one_evaluation_protocol_is_the_default_everywhere():
    from moe_compress.pipeline import EVALUATE_DEFAULTS

    windows = {
        "prune": _default("prune", "--eval-windows"), "slim": _default("slim", "--eval-windows"), "eval": _default("eval", "--max-windows"),
        "recipe": EVALUATE_DEFAULTS["windows"],
    }
    seq_len = {
        "prune": _default("prune", "--eval-seq-len"), "slim": _default("slim", "--eval-seq-len"), "eval": _default("eval", "--seq-len"),
        "recipe": EVALUATE_DEFAULTS["seq_len"],
    }
    assert set(windows.values()) == {DEFAULT_PROTOCOL.windows} and set(seq_len.values()) == {DEFAULT_PROTOCOL.seq_len}, (windows, seq_len)
    assert DEFAULT_PROTOCOL.tokens_per_source >= 32_768
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    # the demo is `fit`: its candidates are measured on fit's own held-out windows, left at their defaults
    assert "moe-compress fit" in demo and "--eval-windows" not in demo and "--eval-seq-len" not in demo, "the demo uses the defaults"
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        evaluate = yaml.safe_load(recipe.read_text()).get("evaluate") or {}
        assert not {"windows", "seq_len"} & set(evaluate), f"{recipe.name} overrides the protocol"


def test_every_bundled_test_split_holds_the_protocol_windows():
    from moe_compress.data.batches import read_windows
    from moe_compress.data.texts import bundled_domains
    from moe_compress.source.load import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("ref-mixtral"), False, "ref-mixtral")
    for domain in bundled_domains():
        windows = read_windows(tokenizer, f"bundled:{domain}", DEFAULT_PROTOCOL.seq_len, DEFAULT_PROTOCOL.windows)
        assert windows.shape == (DEFAULT_PROTOCOL.windows, DEFAULT_PROTOCOL.seq_len), domain


def test_the_protocol_in_force_is_printed_and_recorded(pruned):
    out, stdout = pruned
    assert "perplexity protocol: 128 windows x 32 tokens per source" in stdout and "(the default is 128 x 256)" in stdout
    summary = json.loads((out / "moe_compress_summary.json").read_text())
    assert summary["evaluation"]["protocol_line"].startswith("perplexity protocol: 128 windows x 32")


# ---- 3. calibration once for many methods -----------------------------------------------------
def test_a_second_method_on_the_same_model_and_data_hits_the_cache(tmp_path):
    model, batches = tiny_model("deepseek_v3"), token_batches(count=2)
    pruning = [name for name, method in METHODS.items() if method.family == "pruning"]
    first, hit = collect_statistics(model, batches, METHODS["reap"].needs(), tmp_path)
    assert not hit
    for name in pruning:
        needed = METHODS[name].needs()
        cached, hit = collect_statistics(model, batches, needed, tmp_path)
        fresh, _ = collect_statistics(model, batches, needed, cache_dir=False)
        assert hit, f"{name} calibrated again"
        assert all(torch.equal(cached[layer][stat], fresh[layer][stat]) for layer in fresh for stat in fresh[layer]), name
        assert all(set(named) == set(needed) | {"tokens"} for named in cached.values()), "only what was asked is returned"
    # A parameterised statistic the superset lacks (another probe size) calibrates once more, then is cached too.
    other_probe = METHODS["cprune-cosine"].needs({"probe_tokens": 8})
    assert not collect_statistics(model, batches, other_probe, tmp_path)[1]
    assert collect_statistics(model, batches, other_probe, tmp_path)[1] and collect_statistics(model, batches, METHODS["mone"].needs(), tmp_path)[1]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1, "the larger entry replaces the one it contains"


def test_the_cache_still_refuses_another_expert_count(tmp_path):
    model, batches = tiny_model("mixtral"), token_batches(count=1)
    collect_statistics(model, batches, ("selected",), tmp_path)
    entry = next(tmp_path.glob("*.safetensors"))
    from moe_compress.walk.cache import StatsCache

    key = entry.name.split(".")[0]
    assert StatsCache(tmp_path).load(key, {0: 8, 1: 8, 2: 8}, ("selected",)) is not None
    assert StatsCache(tmp_path).load(key, {0: 8, 1: 8, 2: 7}, ("selected",)) is None
    assert StatsCache(tmp_path).load(key, {0: 8, 1: 8}, ("selected",)) is None


# ---- 4. quiet, readable output ----------------------------------------------------------------
def test_piped_output_is_never_wrapped(tiny, pruned, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    out, prune_stdout = pruned
    outputs = {"prune": prune_stdout}
    long_model = shutil.copytree(tiny["mixtral"], tmp_path / ("model-" + "y" * 110))
    runs = {
        "eval": ("eval", long_model, "--ppl", tiny["calib"], "--seq-len", "32", "--max-windows", "4"),
        "inspect": ("inspect", long_model),
        "drop": ("drop", tiny["mixtral"], *common(tiny), "--unit", "block", "--drop", "1", "--out", tmp_path / LONG),
        "methods": ("methods",),
        "dry-run": ("prune", long_model, "--plan-in", tiny["root"] / "plan.json", "--out", tmp_path / ("d" + LONG), "--dry-run"),
    }
    for name, args in runs.items():
        result, stdout, stderr = cli(*args)
        assert result.exit_code == 0, f"{name}: {stdout}{stderr}"
        outputs[name] = stdout + stderr
    for name, text in outputs.items():
        for marker in (LONG, long_model.name):
            for line in text.splitlines():
                assert marker[:20] not in line or marker in line, f"{name}: a line was wrapped: {line!r}"
        assert "-0.0%" not in text and not re.search(r"\b(ratio|budget)=None", text), name
    plan_rows = [line for line in prune_stdout.splitlines() if re.match(r"^│\s+\d+ │", line)]
    assert len(plan_rows) == 3, "one plan row per MoE layer, none wrapped"
    assert "plan: block-drop-discrete" in outputs["drop"]


def test_quiet_prints_results_only_and_normal_runs_name_their_steps(tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("MOE_COMPRESS_QUIET", raising=False)
    monkeypatch.setattr(progress, "SUMMARY_AFTER_S", 0.0)  # every step leaves its line, however fast
    args = ["prune", tiny["mixtral"], *common(tiny), "--eval", tiny["calib"], "--eval-seq-len", "32", "--eval-windows", "2", "--no-cache"]
    result, stdout, stderr = cli(*args, "--out", tmp_path / "quiet", "--quiet")
    assert result.exit_code == 0 and stderr == "", stderr
    assert "perplexity" in stdout and "saved" in stdout
    result, stdout, stderr = cli(*args, "--out", tmp_path / "normal")
    assert result.exit_code == 0, stderr
    assert f"perplexity {tiny['calib']} (before): 1/1 done in" in stderr and f"perplexity {tiny['calib']} (after): 1/1 done in" in stderr
    assert "calibrating" in stderr or "observing" in stderr
    assert "\r" not in stderr and "━" not in stderr, "no bar animation off a terminal"


def test_a_long_task_off_a_terminal_reports_once_a_minute_then_once_done(monkeypatch, capsys):
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(progress, "SUMMARY_AFTER_S", 0.0)
    previous = progress.set_verbosity("normal")
    try:
        assert list(progress.track(range(3), "scoring pydoc")) == [0, 1, 2]
    finally:
        progress.set_verbosity(previous)
    assert capsys.readouterr().err.splitlines() == [
        "scoring pydoc: 1/3, 0s elapsed, about 0s left", "scoring pydoc: 2/3, 0s elapsed, about 0s left", "scoring pydoc: 3/3 done in 0s",
    ]


# ---- 5. say what the output is ----------------------------------------------------------------
def test_a_stock_output_says_so_and_has_a_model_card(pruned, tiny):
    out, stdout = pruned
    assert f"saved {out}: stock transformers checkpoint (no trust_remote_code); tokenizer is stock" in stdout
    assert f'    model = AutoModelForCausalLM.from_pretrained("{out}")' in stdout
    card = (out / "README.md").read_text()
    for part in ("## What was done", "method `reap`, ratio 0.25, layer budget", "6 of 8 routed experts kept in layers 0-2", "## Size",
                 "## Quality", "| perplexity", "## How to load", "Stock transformers checkpoint", "## How it was made",
                 f"moe-compress prune {tiny['mixtral']}", "moe-compress 0.1.0"):
        assert part in card, part
    assert "trust_remote_code=True" not in card
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config


def test_a_remote_code_output_gives_a_snippet_that_loads_it_without_moe_compress(tiny, tmp_path):
    out = tmp_path / "mone"
    result, stdout, stderr = cli("prune", tiny["mixtral"], *common(tiny), "--batch-size", "4", "--method", "mone", "--out", out, "--no-cache")
    assert result.exit_code == 0, stderr
    assert "needs trust_remote_code=True" in stdout and f'from_pretrained("{out}", trust_remote_code=True)' in stdout
    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace('"."', json.dumps(str(out)))
    assert "trust_remote_code=True" in snippet and "novice vectors" in card
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # moe_compress is not importable there
    check = subprocess.run([sys.executable, "-c", snippet + "\nprint(type(model).__name__, len(tokenizer))"], cwd="/", env=env,
                           capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and "MoECompressMixtralForCausalLM" in check.stdout, check.stderr[-2000:]
    assert "Do you wish to run the custom code" not in check.stdout + check.stderr


def test_outputs_are_readable_by_everyone_under_a_private_umask(tiny, tmp_path):
    import moe_compress as mc

    previous = os.umask(0o077)
    try:
        mc.compress(tiny_model("mixtral"), "frequency", 0.25, calib=token_batches(), out=tmp_path / "pruned", cache_dir=False)
        result, _, stderr = cli("quantize", tiny["mixtral"], "--bits", "8", "--out", tmp_path / "quantized")
        assert result.exit_code == 0, stderr
    finally:
        os.umask(previous)
    for directory in (tmp_path / "pruned", tmp_path / "quantized"):
        assert (directory / "README.md").is_file()
        for path in [directory, *directory.rglob("*")]:
            needed = 0o055 if path.is_dir() else 0o044
            assert path.stat().st_mode & needed == needed, f"{path} is {oct(path.stat().st_mode)}"
    assert "compressed-tensors" in (tmp_path / "quantized" / "README.md").read_text()


# ---- 6. fail early; dry runs -------------------------------------------------------------------
def _no_work(monkeypatch):
    """Make calibration and evaluation impossible: a check that needed them would fail the test."""
    import moe_compress.engine.prepare  # noqa: F401
    import moe_compress.evaluate.lm_perplexity  # noqa: F401
    import moe_compress.recipes  # noqa: F401

    def refuse(*args, **kwargs):
        raise AssertionError("calibration or evaluation ran before the input was checked")

    for module, name in (("moe_compress.engine.prepare", "batches_of"), ("moe_compress.recipes", "calibration_batches"),
                         ("moe_compress.evaluate.lm_perplexity", "perplexity")):
        monkeypatch.setattr(sys.modules[module], name, refuse)


@pytest.mark.parametrize(
    "case, message",
    [
        ("slim-shared", r"has no shared weights to sparsify"),
        ("ratio-too-high", r"fewer than its router needs"),
        ("drop-too-many", r"can drop 1\.\.2 blocks; asked for 5"),
        ("missing-directory", r"'slim24/' not found: no such directory"),
    ],
)
def test_impossible_requests_fail_before_any_calibration(case, message, tiny, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    evaluate = ["--eval", tiny["calib"], "--eval-seq-len", "32"]
    args = {
        "slim-shared": ["slim", tiny["mixtral"], *common(tiny), "--targets", "experts,shared,attention", *evaluate],
        "ratio-too-high": ["prune", tiny["mixtral"], *common(tiny), "--ratio", "0.9", *evaluate],
        "drop-too-many": ["drop", tiny["mixtral"], *common(tiny), "--unit", "block", "--drop", "5"],
        "missing-directory": ["quantize", "slim24/"],
    }[case]
    result, stdout, stderr = cli(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2 and re.search(message, stderr), stdout + stderr
    assert not (tmp_path / "out").exists()


def test_a_recipe_is_checked_against_the_model_before_calibration(tiny, tmp_path, monkeypatch):
    from moe_compress import run_recipe

    _no_work(monkeypatch)
    recipe = {"model": str(tiny["mixtral"]), "calibration": {"source": str(tiny["calib"]), "samples": 8, "seq_len": 32},
              "stages": [{"prune": {"ratio": 0.25}}, {"slim": {"targets": ["experts", "shared"]}}]}
    with pytest.raises(Exception, match=r"stage 2 \(slim\): this mixtral model has no shared weights"):
        run_recipe(recipe, out=tmp_path / "out")
    recipe["stages"] = [{"finetune": {"steps": 1}}]
    with pytest.raises(Exception, match=r"stage 1 \(finetune\): this model has no condensed layers"):
        run_recipe(recipe, out=tmp_path / "out")


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def test_dry_runs_print_what_would_be_done_and_write_nothing(tiny, pruned, tmp_path, monkeypatch):
    _no_work(monkeypatch)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": str(tiny["deepseek"]), "calibration": {"source": str(tiny["calib"]), "samples": 8, "seq_len": 32},
                                      "evaluate": {"ppl": str(tiny["calib"]), "seq_len": 32},
                                      "stages": [{"drop": {"unit": "moe", "n": 1}}, {"prune": {"ratio": 0.5}}, {"quantize": {"bits": 8}}]}))
    cache = tmp_path / "cache"
    out = tmp_path / "new" / "out"  # its parent does not exist either: it must not be created
    runs = {
        "prune": (["prune", tiny["mixtral"], *common(tiny), "--cache-dir", cache], ["every MoE layer would keep 6 of 8 experts"]),
        "prune-plan": (["prune", tiny["mixtral"], "--plan-in", tiny["root"] / "plan.json"], ["plan: reap, ratio=0.25, budget=layer", "size the plan gives", "no calibration would run"]),
        "drop": (["drop", tiny["mixtral"], "--unit", "moe", "--drop", "1"], ["would drop 1 MoE sub-layers"]),
        "condense": (["condense", tiny["deepseek"], "--layers", "1"], ["would condense 1 of 2 MoE layers"]),
        "slim": (["slim", tiny["deepseek"], "--targets", "experts,shared", "--nm", "2:4"], ["would zero 2:4 of experts", "of shared"]),
        "quantize": (["quantize", tiny["mixtral"], "--bits", "4"], ["would quantise", "4 bits"]),
        "run": (["run", recipe], ["stages:", "  3. quantize: bits=8"]),
    }
    before = _tree(tmp_path), _tree(tiny["root"])
    for name, (args, expected) in runs.items():
        extra = ["--out", out] if name != "run" else ["--out", out]
        result, stdout, stderr = cli(*args, *extra, "--dry-run")
        assert result.exit_code == 0, f"{name}: {stdout}{stderr}"
        for text in expected:
            assert text in stdout, f"{name}: {text!r} not in {stdout}"
        assert "nothing was calibrated" in stdout
    assert (_tree(tmp_path), _tree(tiny["root"])) == before, "a dry run wrote something"


# ---- 7. plots that teach ------------------------------------------------------------------------
def test_analyze_marks_what_a_plan_removes_and_writes_one_report(tiny, tmp_path):
    from moe_compress.source.load import load_model
    from moe_compress.methods import PlanRequest
    from moe_compress.arch import get_adapter
    from moe_compress.engine.prepare import calibration_batches
    from moe_compress.data.batches import CalibrationSpec

    out = tmp_path / "analysis"
    result, stdout, stderr = cli("analyze", tiny["deepseek"], *common(tiny), "--probe-tokens", "16", "--method", "reap", "--ratio", "0.5",
                                 "--normalize", "layer", "--similarity-layer", "1", "--similarity-layer", "2", "--report", "--out", out,
                                 "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, stdout + stderr
    report = json.loads((out / "analysis.json").read_text())
    model, tokenizer = load_model(tiny["deepseek"])
    batches = calibration_batches(CalibrationSpec(str(tiny["calib"]), 8, 32), tokenizer, model.config)
    stats, hit = collect_statistics(model, batches, METHODS["reap"].needs(), tmp_path / "cache")
    assert hit, "analyze cached the statistics a method needs"
    plan = METHODS["reap"].make_plan(PlanRequest(get_adapter(model), model.config, stats, 0.5, "layer"))
    assert report["removed"] == {str(lp.layer): lp.removed for lp in plan.layers}
    rows = (out / "analysis.csv").read_text().splitlines()
    assert rows[0].endswith(",removed") and sum(row.endswith(",1") for row in rows[1:]) == sum(len(lp.removed) for lp in plan.layers)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "heatmap_frequency.png", "heatmap_gate_mass.png", "heatmap_output_variance.png", "heatmap_reap.png",
        "similarity_layer1.png", "similarity_layer2.png",
    ]
    page = (out / "report.html").read_text()
    assert page.count("<img ") == 6 and "data:image/png;base64," in page and "removed by the plan" in page and "<h2>Per expert</h2>" in page


def test_similarity_plot_orders_experts_by_cluster():
    import numpy as np

    from moe_compress.report.plots import cluster_order

    labels = np.array([1, 0, 1, 2, 0, 1])
    frequency = np.array([0.1, 0.5, 0.3, 0.2, 0.1, 0.2])
    order, spans = cluster_order(labels, frequency)
    assert order.tolist() == [2, 5, 0, 1, 4, 3] and spans == [(0, 3), (3, 5), (5, 6)]


# ---- 8. small things ------------------------------------------------------------------------------
def test_version_and_a_help_that_imports_no_torch():
    from moe_compress import __version__

    result, stdout, _ = cli("--version")
    assert result.exit_code == 0 and stdout.strip() == f"moe-compress {__version__}"
    code = "import sys\nfrom moe_compress.cli import main\nsys.argv = ['moe-compress', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\n" \
           "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'lm_eval', 'matplotlib') if m in sys.modules))"
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert "HEAVY []" in check.stdout, check.stdout[-2000:] + check.stderr[-2000:]
    assert "--quiet" in check.stdout and "--version" in check.stdout


def test_methods_lists_every_method_and_stage():
    from moe_compress.stages import stages

    STAGES = stages()
    from moe_compress.slimming import SLIM_METHODS

    result, stdout, _ = cli("methods")
    assert result.exit_code == 0
    for name in [*METHODS, *STAGES, *SLIM_METHODS, "probe_tokens=64", "bits=4"]:
        assert name in stdout, name


def test_cache_dir_help_states_the_real_default():
    from moe_compress.walk.cache import default_cache_dir

    assert default_cache_dir().parts[-1] == "stats"
    help_text = runner.invoke(app, ["prune", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).stdout
    assert "$MOE_COMPRESS_CACHE/stats" in help_text and "~/.cache/moe_compress/stats" in help_text


def test_inspect_reads_only_config_and_shard_headers(tiny, tmp_path):
    from moe_compress.source.load import load_model

    broken = shutil.copytree(tiny["mixtral"], tmp_path / "headers-only")
    shard = broken / "model.safetensors"
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff" * (len(data) - start)  # every weight is NaN now; the headers are intact
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="NaN"):
        load_model(broken)
    result, stdout, stderr = cli("inspect", broken, "--json")
    assert result.exit_code == 0, stderr
    expected, _ = cli("inspect", tiny["mixtral"], "--json")[1:]
    assert json.loads(stdout)["size"] == json.loads(expected)["size"]
