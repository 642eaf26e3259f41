"""A writer to kill: saves a tiny checkpoint to an output and is SIGKILLed at a chosen step.

Run as a subprocess by tests/test_publish.py: `python kill_driver.py CHECKPOINT OUT`. It loads
the checkpoint once, then answers one command per stdin line with one JSON line on stdout; each
command runs in a forked child, so every run is a fresh process with a real pid that is dead
when the next one starts (the parent reaps it), as after `kill -9` of the CLI:

  save VERSION KILL_AT  save version 0 (the checkpoint) or 1 (its weights negated) to OUT with
                        overwrite; the child SIGKILLs itself just before its KILL_AT-th file-system
                        operation (0: never). Answers {"killed": bool, "steps": operations done,
                        "publish": operations done when the finished checkpoint began to be moved
                        into place (the replacement of an existing output)}.
  next                  what the next run does first: check OUT with overwrite (restoring and
                        cleaning what a killed writer left), then give it back. Answers
                        {"error": message or null}.

A file-system operation is an audit event of the calls that create, open, list, rename, chmod
or remove paths (every `open`, whether to read or write), counted from the start of the run.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable

import torch

from moe_compress.source.load import load_model
from moe_compress.sink import save as saving
from moe_compress.sink.output_lock import release_all
from moe_compress.sink.publish import check_output_dir

STEPS = frozenset({
    "open", "os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "os.chmod", "os.truncate",
    "os.link", "os.symlink", "os.listdir", "os.scandir", "shutil.rmtree",
})


def _kill_at(step: int) -> list[int]:
    """Count file-system operations in this process; SIGKILL it just before the `step`-th."""
    seen = [0]

    def hook(event: str, _args: tuple) -> None:
        if event in STEPS:
            seen[0] += 1
            if seen[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    return seen


def _in_child(run: Callable[[], dict]) -> dict:
    """`run` in a forked child; its answer, or {"killed": True} when it was SIGKILLed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            answer = run()
        except BaseException:  # a bug in the writer: report it, do not pass for a kill
            answer = {"crash": traceback.format_exc()}
        os.write(write, json.dumps(answer).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return {"killed": True}
    return json.loads(answer)


def main(checkpoint: str, out: str) -> None:
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the runs print goes to stderr; stdout carries only the answers
    model, tokenizer = load_model(checkpoint)
    negated = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in negated.parameters():
            parameter.neg_()
    versions = [model, negated]

    def save(version: int, kill_at: int) -> dict:
        seen, published, real_publish = _kill_at(kill_at), [], saving.publish

        def publish(*args):
            published.append(seen[0])
            return real_publish(*args)

        saving.publish = publish
        saving.save_compressed(versions[version], out, tokenizer, overwrite=True)
        return {"killed": False, "steps": seen[0], "publish": published[0]}

    def next_run() -> dict:
        try:
            check_output_dir(out, overwrite=True)
        except Exception as exc:  # noqa: BLE001 -- the test shows what refused
            return {"error": str(exc)}
        release_all()
        return {"error": None}

    for line in sys.stdin:
        command, *args = line.split()
        answer = _in_child(lambda: save(int(args[0]), int(args[1]))) if command == "save" else _in_child(next_run)
        print(json.dumps(answer), file=answers, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
