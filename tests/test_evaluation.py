"""The evaluation suite: multiple-choice tasks (built here, scored by lm-eval), speed, and `eval`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from moe_compress.cli import app
from moe_compress.evaluate import mc_tasks
from moe_compress.evaluate.harness import parse_task_list, run_tasks
from moe_compress.errors import MoECompressError
from moe_compress.source import load_model
from tiny_checkpoints import save_tiny_checkpoint, write_calibration

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral")


@pytest.fixture(scope="module")
def built():
    return mc_tasks.build_tasks()


def test_builder_is_deterministic_and_matches_the_shipped_files(built, tmp_path):
    assert mc_tasks.build_tasks() == built
    assert mc_tasks.build_tasks(seed=1) != built
    written = mc_tasks.write_tasks(tmp_path)
    for path in written:
        shipped = mc_tasks.TASKS_DIR / path.name
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: rerun python -m moe_compress.evaluate.mc_tasks"
    assert sum(p.stat().st_size for p in written) < 1_000_000


def test_every_item_has_one_true_answer_among_four_distinct_choices(built):
    assert sorted(built) == sorted(mc_tasks.task_names())
    documents = {d: {doc.id: doc for doc in mc_tasks.read_documents(d)} for d in mc_tasks.DOMAINS}
    for task, items in built.items():
        assert len(items) == 250, task
        assert len({item.id for item in items}) == len(items)
        labels = [item.label for item in items]
        assert all(labels.count(k) > len(items) / 8 for k in range(4)), f"{task}: answer positions are not shuffled"
        for item in items:
            assert len(item.choices) == 4 and len(set(item.choices)) == 4 and 0 <= item.label < 4
            if task == mc_tasks.DEFINITION_TASK:
                doc = documents["dictionary"][item.id]
                assert mc_tasks._definition(doc) == (item.context[:-1], item.choices[item.label].strip())
                assert all(item.context[:-1].lower() not in c.lower() for c in item.choices)
            else:
                doc = documents[task.rsplit("_", 1)[1]][item.id.rpartition("@")[0]]
                # The labelled choice continues the context in its document; no other choice does.
                found = [item.context + choice in doc.text for choice in item.choices]
                assert found == [k == item.label for k in range(4)], item.id
                assert 22 <= len(item.context.split()) <= 30


def test_lm_eval_scores_a_moec_task_on_a_tiny_model(checkpoint):
    model, tokenizer = load_model(checkpoint)
    scores = run_tasks(model, tokenizer, ["moec_continuation_pydoc"], limit=4, batch_size=4)
    score = scores["moec_continuation_pydoc"]
    assert score.samples == 4 and not score.group
    for value in (score.acc, score.acc_norm):
        assert value is not None and 0.0 <= value <= 1.0
    assert score.acc_stderr is not None and score.acc_stderr >= 0


def _write_task(directory, name: str, items: list[dict]) -> None:
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    spec = (mc_tasks.TASKS_DIR / "moec_definition.yaml").read_text()
    (directory / f"{name}.yaml").write_text(spec.replace("moec_definition", name))


def test_a_forced_answer_scores_exactly(checkpoint, tmp_path):
    """With the final norm zeroed every logit is 0, so each token costs exactly log(vocab) nats and
    the choice with the fewest tokens has the highest likelihood: acc is 1.0 when that choice is
    the labelled one, 0.0 when the longest is. This checks the label/choice wiring end to end."""
    model, tokenizer = load_model(checkpoint)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    choices = [" a", " a a", " a a a", " a a a a"]
    shortest = [{"id": str(k), "context": "The router", "choices": choices[k:] + choices[:k], "label": (4 - k) % 4} for k in range(4)]
    longest = [dict(item, label=(item["label"] + 3) % 4) for item in shortest]
    _write_task(tmp_path, "forced_shortest", shortest)
    _write_task(tmp_path, "forced_longest", longest)
    scores = run_tasks(model, tokenizer, ["forced_shortest", "forced_longest"], batch_size=4, include_path=[tmp_path])
    assert scores["forced_shortest"].acc == 1.0 and scores["forced_shortest"].samples == 4
    assert scores["forced_longest"].acc == 0.0


def test_task_list_errors_are_user_errors():
    assert parse_task_list(" moec, moec_definition ,moec") == ["moec", "moec_definition"]
    for bad in ("", "moec,,x", " , "):
        with pytest.raises(MoECompressError):
            parse_task_list(bad)


def test_eval_compare_against_itself(checkpoint, tmp_path):
    calib = write_calibration(tmp_path / "text.jsonl")
    out = tmp_path / "eval.json"
    args = ["eval", checkpoint, "--ppl", calib, "--seq-len", "32", "--max-windows", "2", "--tasks", "moec_definition",
            "--limit", "4", "--compare", checkpoint, "--speed-repeats", "1", "--speed-batch", "1", "--speed-prompt-len", "16",
            "--speed-new-tokens", "4", "--threads", "1", "--json", out]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # not the command's --threads 1, so a leak shows
    try:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stdout + result.stderr
        assert torch.get_num_threads() == 2, "--threads must not leak out of the command"
    finally:
        torch.set_num_threads(previous)
    assert "decode tokens/s" in result.stdout and "acc moec_definition" in result.stdout
    report = json.loads(out.read_text())
    per_model = {"model", "perplexity", "tasks", "params", "bytes_in_memory", "checkpoint_bytes", "peak_rss_bytes", "speed"}
    assert per_model | {"seq_len", "settings", "original", "comparison"} <= set(report)
    assert per_model <= set(report["original"])
    assert set(report["params"]) == {"total", "routed", "active_per_token"}
    assert report["params"]["total"] > report["params"]["active_per_token"] > 0 and report["checkpoint_bytes"] > 0
    assert report["peak_rss_bytes"] > 0
    assert set(report["tasks"]["moec_definition"]) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "samples"}
    comparison = report["comparison"]
    # The same weights give the same scores; timings only have to be real numbers.
    assert comparison["perplexity_ratio"][str(calib)] == 1.0
    assert comparison["acc_delta"]["moec_definition"] == 0.0 and comparison["params_ratio"]["total"] == 1.0
    for key in ("prefill_ratio", "decode_ratio"):
        assert math.isfinite(comparison["speed"][key]) and comparison["speed"][key] > 0
    for side in (report, report["original"]):
        assert all(math.isfinite(side["speed"][k]) and side["speed"][k] > 0 for k in ("prefill_tokens_per_s", "decode_tokens_per_s"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "moec,,"], "--tasks"),
        (["--limit", "0"], "--limit"),
        (["--speed-repeats", "0"], "repeats"),
        (["--threads", "0"], "--threads"),
        (["--compare", "/nonexistent/model"], "not found"),
    ],
)
def test_eval_bad_input_is_a_clear_error(checkpoint, args, message):
    result = runner.invoke(app, ["eval", str(checkpoint), *args])
    text = " ".join(result.stderr.split())  # rich wraps long lines at the terminal width
    assert result.exit_code == 2, result.stdout + result.stderr
    assert text.startswith("error:") and message in text and "Traceback" not in text, result.stderr


@pytest.mark.slow
def test_unknown_task_name_is_a_user_error():
    from moe_compress.evaluate.harness import select_tasks

    with pytest.raises(MoECompressError, match="unknown task 'no_such_task_xyz'"):
        select_tasks(["no_such_task_xyz"])
