"""Multiple-choice accuracy through lm-evaluation-harness, on a model already in memory.

Why lm-eval rather than our own scorer: its loglikelihood batching, acc / acc_norm definitions
and standard errors are what published numbers use, and any of its tasks (``hellaswag``,
``arc_easy``, ...) then works here too for users with Hub access. Our own offline tasks
(``moec``, see `mc_tasks`) live in ``tasks/`` as ordinary lm-eval YAML + jsonl.

Those YAML files name their data relative to their own directory, but ``datasets`` resolves
``data_files`` against the working directory. So for every task defined in an included
directory with local ``data_files`` we hand lm-eval the config itself, with the paths made
absolute (our groups are expanded into those task configs and averaged here); everything else
goes to lm-eval by name. lm-eval's own 200+ task directories take
~15 s to index, so they are only indexed when a requested name is not one of ours.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import MoECompressError, OptionError
from ..source.residency import Weights
from .mc_tasks import TASKS_DIR


@dataclass(frozen=True)
class TaskScore:
    """Accuracy of one task (or the unweighted mean over a group's tasks), with standard errors."""

    task: str
    acc: float | None
    acc_stderr: float | None
    acc_norm: float | None
    acc_norm_stderr: float | None
    samples: int | None  # questions scored (after --limit), summed over a group's tasks
    group: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def parse_task_list(spec: str) -> list[str]:
    """``"moec, arc_easy"`` -> ``["moec", "arc_easy"]``; an empty entry is a user error."""
    names = [name.strip() for name in spec.split(",")]
    if not spec.strip() or not all(names):
        raise OptionError("tasks", f"must be a comma-separated list of task or group names; got {spec!r}.")
    return list(dict.fromkeys(names))


def _absolute(files: Any, base: Path) -> Any:
    """`data_files` (a path, a list of them, or split -> either) resolved against `base`."""
    if isinstance(files, dict):
        return {split: _absolute(f, base) for split, f in files.items()}
    if isinstance(files, list):
        return [_absolute(f, base) for f in files]
    return str((base / str(files)).resolve())


def _local_configs(directories: Sequence[Path]) -> tuple[dict[str, dict], dict[str, dict]]:
    """(tasks, groups) defined by plain YAML in `directories`, with relative data_files made absolute."""
    tasks: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    for directory in directories:
        for path in sorted(Path(directory).glob("*.yaml")):
            try:
                config = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError:  # e.g. `!function` tags: lm-eval's own loader handles those by name
                continue
            if not isinstance(config, dict):
                continue
            if "group" in config and isinstance(config.get("task"), list):
                groups[config["group"]] = config
                continue
            files = (config.get("dataset_kwargs") or {}).get("data_files")
            if "task" not in config or files is None:
                continue
            config["dataset_kwargs"]["data_files"] = _absolute(files, path.parent)
            tasks[config["task"]] = config
    return tasks, groups


def _expand(names: Sequence[str], tasks: dict[str, dict], groups: dict[str, dict]) -> tuple[list[str | dict], dict[str, list[str]]]:
    """lm-eval specs for `names`, and our groups with their member tasks.

    Our groups are expanded into their tasks' configs (and averaged here, see `_group_score`):
    lm-eval 0.4.13 passes a group given as a config dict on to its member tasks as overrides,
    which TaskConfig rejects.
    """
    specs: list[str | dict] = []
    expanded: dict[str, list[str]] = {}
    for name in names:
        if name in groups and all(isinstance(m, str) and m in tasks for m in groups[name]["task"]):
            expanded[name] = list(groups[name]["task"])
            specs += [tasks[m] for m in expanded[name]]
        else:
            specs.append(tasks.get(name, name))
    unique: dict[str, str | dict] = {s if isinstance(s, str) else s["task"]: s for s in specs}
    return list(unique.values()), expanded


def _group_score(name: str, members: list[TaskScore]) -> TaskScore:
    """Unweighted mean over the member tasks (as the group YAML says); the stderr of a mean of
    independent estimates is sqrt(sum of their variances) / count."""

    def mean(values: list[float | None]) -> float | None:
        return None if not values or any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]

    def stderr(values: list[float | None]) -> float | None:
        return None if not values or any(v is None for v in values) else math.sqrt(sum(v * v for v in values)) / len(values)  # type: ignore[operator]

    return TaskScore(
        task=name,
        acc=mean([m.acc for m in members]),
        acc_stderr=stderr([m.acc_stderr for m in members]),
        acc_norm=mean([m.acc_norm for m in members]),
        acc_norm_stderr=stderr([m.acc_norm_stderr for m in members]),
        samples=sum(m.samples or 0 for m in members),
        group=True,
    )


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs warnings that do not apply to an in-memory model (e.g. 'pretrained is not a str').

    It also describes the environment in its results, which we drop: `git describe` in the
    working directory (printing "fatal: not a git repository" outside one) and torch's
    collect_env (which runs pip and nvidia-smi). Both are skipped for the call.
    """
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    from lm_eval import evaluator

    saved = {name: getattr(evaluator, name) for name in ("get_git_commit_hash", "add_env_info")}
    evaluator.get_git_commit_hash = lambda: None
    evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        logger.setLevel(level)
        for name, value in saved.items():
            setattr(evaluator, name, value)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


@dataclass
class TaskSelection:
    """Requested names resolved to lm-eval specs, checked before any model is loaded."""

    names: list[str]
    specs: list[str | dict]
    expanded: dict[str, list[str]]  # our groups -> their tasks
    manager: Any  # lm_eval.tasks.TaskManager


def select_tasks(names: Sequence[str], include_path: Sequence[str | Path] = ()) -> TaskSelection:
    """Resolve task/group names (ours first, then lm-eval's); an unknown name is a user error."""
    if not names:
        raise MoECompressError("no tasks given.")
    with _quiet_lm_eval():
        from lm_eval.tasks import TaskManager

        directories = [TASKS_DIR, *(Path(p) for p in include_path)]
        local_tasks, local_groups = _local_configs(directories)
        specs, expanded = _expand(names, local_tasks, local_groups)
        by_name = [s for s in specs if isinstance(s, str) and not Path(s).is_file()]
        manager = TaskManager(include_path=[str(d) for d in directories], include_defaults=bool(by_name))
    unknown = [name for name in by_name if name not in manager.all_tasks]
    if unknown:
        raise MoECompressError(
            f"unknown task {unknown[0]!r}: not one of ours ({', '.join(sorted({*local_groups, *local_tasks}))}) "
            "nor an lm-eval task, group or tag (`lm_eval ls tasks` lists them)."
        )
    try:  # builds the tasks once, so a dataset that cannot be had fails now, before any model loads
        with _quiet_lm_eval():
            manager.load(deepcopy(specs))
    except (OSError, ValueError) as exc:  # ConnectionError (offline Hub) is an OSError
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoECompressError(f"cannot load the data of task(s) {', '.join(names)}: {message}") from None
    return TaskSelection(list(names), specs, expanded, manager)


def run_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    tasks: Sequence[str] | TaskSelection,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: Sequence[str | Path] = (),
    seed: int = 0,
    weights: Weights | None = None,
    device: str = "cpu",
) -> dict[str, TaskScore]:
    """Zero-shot acc / acc_norm of `model` on lm-eval tasks or groups (ours: ``moec`` and its tasks).

    `limit` scores only the first questions of each task; `include_path` adds directories of
    task YAML files to ours (ignored when `tasks` is already a `TaskSelection`). A streamed
    model (`weights`) is scored in one layer-streamed pass (`StreamedLM`).
    """
    if tokenizer is None:
        raise MoECompressError("this checkpoint has no tokenizer, so multiple-choice tasks cannot be scored.")
    if limit is not None and limit < 1:
        raise OptionError("limit", f"must be a positive number of questions per task; got {limit}.")
    selection = tasks if isinstance(tasks, TaskSelection) else select_tasks(tasks, include_path)
    with _quiet_lm_eval():
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        if weights is not None and weights.streamed:
            from .streamed_lm import StreamedLM

            lm = StreamedLM(model, weights, tokenizer, batch_size, device)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = simple_evaluate(
            model=lm, tasks=deepcopy(selection.specs), limit=limit, task_manager=selection.manager, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    if output is None:  # only non-zero ranks of a distributed run get None
        return {}
    subtasks = output.get("group_subtasks", {})
    scores = {}
    for name, metrics in output["results"].items():
        samples = output.get("n-samples", {}).get(name, {}).get("effective")
        scores[name] = TaskScore(
            task=name,
            acc=_number(metrics.get("acc,none")),
            acc_stderr=_number(metrics.get("acc_stderr,none")),
            acc_norm=_number(metrics.get("acc_norm,none")),
            acc_norm_stderr=_number(metrics.get("acc_norm_stderr,none")),
            samples=int(samples) if samples is not None else None,
            group=bool(subtasks.get(name)),
        )
    for name, members in selection.expanded.items():
        scores[name] = _group_score(name, [scores[m] for m in members if m in scores])
    # The order asked for: each of our groups right after its tasks, then whatever lm-eval added.
    order = [s if isinstance(s, str) else s["task"] for s in selection.specs]
    order = [n for name in selection.names for n in (*selection.expanded.get(name, ()), name)] + order
    return {name: scores[name] for name in dict.fromkeys([*order, *scores]) if name in scores}
