"""Publishing outputs never loses data: unsafe targets, replacement, a second writer, stale staging."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_compress import MoECompressError
from moe_compress.cli import app
from moe_compress.sink.output_lock import HOST, release_all
from moe_compress.sink.publish import check_output_dir, publish
from moe_compress.sink.staging import ASIDE, MARKER, discard_staging, staging_dir
from tiny_checkpoints import save_tiny_checkpoint

runner = CliRunner()


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    release_all()


def _checkpoint_dir(path: Path, text: str) -> Path:
    """A stand-in checkpoint: what publish moves is directories, whatever they hold."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(text)
    (path / "model.safetensors").write_bytes(text.encode() * 100)
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_out_dot_overwrite_refuses_and_deletes_nothing(tmp_path, monkeypatch):
    work = tmp_path / "work"
    model = save_tiny_checkpoint(work / "model")
    (work / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path)):
        result = runner.invoke(app, ["prune", "model", "--out", out, "--overwrite", "--seq-len", "32"])
        assert result.exit_code == 2, result.output
        assert "current directory or one of its parents" in result.stderr
    assert _snapshot(tmp_path) == before
    assert model.is_dir()


@pytest.mark.parametrize("where", ["model", "model/sub", "."])
def test_out_may_not_be_contain_or_lie_inside_the_input(where, tmp_path, monkeypatch):
    model = save_tiny_checkpoint(tmp_path / "parent" / "model")
    monkeypatch.chdir(tmp_path / "parent" / "model" if where == "." else tmp_path)
    out = {"model": model, "model/sub": model / "sub", ".": tmp_path / "parent"}[where]
    before = _snapshot(tmp_path)
    with pytest.raises(MoECompressError, match="input|current directory"):
        check_output_dir(out, overwrite=True, inputs=[model])
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_checkpoint_directories(tmp_path):
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.tex").write_text("years of work")
    with pytest.raises(MoECompressError, match="not a checkpoint"):
        check_output_dir(documents, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(MoECompressError, match="not a directory"):
        check_output_dir(tmp_path / "file", overwrite=True)
    assert (documents / "thesis.tex").read_text() == "years of work"


def test_replacement_keeps_the_old_until_the_new_is_in_place(tmp_path):
    out = _checkpoint_dir(tmp_path / "out", "old")
    check_output_dir(out, overwrite=True)
    work = staging_dir(out, "partial")
    new = _checkpoint_dir(work / "out", "new")
    publish(new, out)
    discard_staging(work)
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no aside, staging or lock file is left behind"


def test_a_failed_replacement_puts_the_old_checkpoint_back_and_leaves_nothing(tmp_path, monkeypatch):
    out = _checkpoint_dir(tmp_path / "out", "old")
    staged = _checkpoint_dir(tmp_path / "staged", "new")
    real_rename = Path.rename

    def rename(self, target):
        if Path(self) == staged:
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(MoECompressError, match="No space left on device"):
        publish(staged, out, overwrite=True)
    assert (out / "config.json").read_text() == "old"
    release_all()  # what the failing command's entry point does (`releases_outputs`)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "staged"], "no aside or lock file is left behind"


def test_a_kill_between_the_two_renames_leaves_the_old_checkpoint(tmp_path):
    """The writer is SIGKILLed right after moving the old output aside; the next run restores it."""
    out = _checkpoint_dir(tmp_path / "out", "old")
    old = _snapshot(out)
    staged = _checkpoint_dir(tmp_path / "staged", "new")
    pid = os.fork()
    if pid == 0:  # the writer: dies at the worst moment
        try:
            real_rename = Path.rename

            def rename(self, target):
                if Path(self) == staged:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real_rename(self, target)

            Path.rename = rename
            publish(staged, out, overwrite=True)
        finally:
            os._exit(3)  # never reached when the kill lands
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not out.exists(), "killed between the renames: the old output is aside"
    asides = [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]
    assert len(asides) == 1 and _snapshot(asides[0] / "out") == old, "the old checkpoint is intact"
    # The next run against the same output puts it back before doing anything else.
    with pytest.raises(MoECompressError, match="choose another out or pass overwrite"):
        check_output_dir(out, overwrite=False)
    assert _snapshot(out) == old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]


def _left_by_dead_writer(out: Path, kind: str) -> Path:
    """A staging directory made by `staging_dir` in a process that then died, with a file in it."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            path = staging_dir(out, kind)
            (path / "f").write_text("x")
            os.write(write, str(path).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        path = Path(pipe.read())
    os.waitpid(pid, 0)
    return path


def _marked(path: Path, pid: int, host: str, kind: str, output: str = "out") -> Path:
    """A directory with a marker as `staging_dir` writes it, naming whichever writer we like."""
    path.mkdir()
    (path / MARKER).write_text(json.dumps({"pid": pid, "host": host, "kind": kind, "output": output, "created": 0}))
    (path / "f").write_text("x")
    return path


def test_stale_staging_of_dead_writers_is_cleaned_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    stale = _left_by_dead_writer(out, "partial")
    live = staging_dir(out, "partial")
    elsewhere = _marked(tmp_path / f".out.recipe-{dead}@another-host-89abcdef", dead, "another-host", "recipe")
    other_output = _left_by_dead_writer(tmp_path / "other", "partial")
    mine = tmp_path / ".out.partial-user-notes"
    mine.mkdir()
    check_output_dir(out, overwrite=False)
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and other_output.exists() and mine.exists()


def test_a_look_alike_user_directory_survives_cleanup(tmp_path):
    """Issue 20 item 2: only what carries our marker, naming the dead writer, is removed."""
    out = tmp_path / "out"
    dead = _dead_pid()
    host = HOST
    unmarked = tmp_path / f".out.partial-{dead}@{host}-0123abcd"
    unmarked.mkdir()
    (unmarked / "thesis.tex").write_text("years of work")
    lying = _marked(tmp_path / f".out.partial-{dead}@{host}-4567cdef", dead + 1, host, "partial")  # marker names another pid
    other_kind = _marked(tmp_path / f".out.recipe-{dead}@{host}-89abcdef", dead, host, "partial")
    other_name = _marked(tmp_path / f".out.quantize-{dead}@{host}-01234567", dead, host, "quantize", output="elsewhere")
    valid_elsewhere = _marked(tmp_path / "elsewhere", dead, host, "partial") / MARKER
    linked = tmp_path / f".out.partial-{dead}@{host}-fedcba98"
    linked.mkdir()
    (linked / "notes").write_text("mine")
    (linked / MARKER).symlink_to(valid_elsewhere)  # a marker must be a file of the directory, not a link
    old_look_alike = _checkpoint_dir(tmp_path / f".out.old-{dead}@{host}-76543210", "someone's")
    empty = tmp_path / f".out.partial-{dead}@{host}-aaaabbbb"  # a writer killed before its marker: nothing to lose
    empty.mkdir()
    before = _snapshot(tmp_path)
    check_output_dir(out, overwrite=False)
    release_all()
    assert _snapshot(tmp_path) == before
    assert all(p.is_dir() for p in (unmarked, lying, other_kind, other_name, linked, old_look_alike))
    assert not out.exists(), "an unmarked look-alike of an aside is not restored as the output"
    assert not empty.exists()


def test_discarding_a_staging_directory_removes_its_marker_last(tmp_path, monkeypatch):
    """So a kill part-way leaves a directory still marked (or empty), never an unmarked remnant."""
    work = staging_dir(tmp_path / "out", "partial")
    _checkpoint_dir(work / "out", "new")
    (work / "stage-1").mkdir()
    left_with_the_marker = []
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name == MARKER:
            left_with_the_marker.append(sorted(os.listdir(self.parent)))
        return real_unlink(self, missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    discard_staging(work)
    assert left_with_the_marker == [[MARKER]] and not work.exists()


def test_a_second_writer_is_refused_while_the_first_holds_the_output(tmp_path, checkpoint_for_cli):
    out = tmp_path / "out"
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the first writer: holds the output until told to stop
        try:
            check_output_dir(out, overwrite=False)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        result = runner.invoke(app, ["prune", str(checkpoint_for_cli), "--out", str(out), "--seq-len", "32", "--samples", "2"])
        assert result.exit_code == 2, result.output
        assert f"another moe-compress run (pid {pid}@" in result.stderr
        assert not out.exists()
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
    check_output_dir(out, overwrite=False)  # free again once the first writer is gone


@pytest.fixture(scope="module")
def checkpoint_for_cli(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def _dead_pid() -> int:
    """A pid that belonged to a process that has exited."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        time.sleep(0.01)
    pytest.skip("could not obtain a dead pid")


def test_an_aside_is_never_deleted_unless_its_replacement_is_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    aside = _left_by_dead_writer(out, ASIDE)
    _checkpoint_dir(aside / "out", "old")
    out.mkdir()
    (out / "notes.txt").write_text("the user's, made after the crash")
    with pytest.raises(MoECompressError, match="not a checkpoint"):
        check_output_dir(out, overwrite=True)
    assert (aside / "out" / "config.json").read_text() == "old" and (out / "notes.txt").is_file()
    assert "both are left as they are" in capsys.readouterr().err


# ---- issue 20 item 1: the lock file is never followed, truncated or written unless ours ----------
def test_a_symlink_at_the_lock_path_is_refused_and_its_target_untouched(tmp_path, checkpoint_for_cli, monkeypatch):
    """`ln -s $PWD/p.txt .victim_out.lock; moe-compress prune ... --out victim_out` used to empty p.txt."""
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "p.txt"
    victim.write_text("precious")
    (tmp_path / ".victim_out.lock").symlink_to(victim)
    result = runner.invoke(app, ["prune", str(checkpoint_for_cli), "--out", "victim_out", "--seq-len", "32", "--samples", "2"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}/.victim_out.lock is a symbolic link, where moe-compress keeps the lock of {tmp_path}/victim_out; it was left untouched. "
        "Move it away or choose another --out."
    ]
    assert victim.read_text() == "precious" and (tmp_path / ".victim_out.lock").is_symlink()
    assert not (tmp_path / "victim_out").exists()


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _hard_link(path: Path) -> None:
    os.link(path.parent / "p.txt", path)


@pytest.mark.parametrize("plant, what", [
    pytest.param(lambda path: path.symlink_to(path.parent / "p.txt"), "a symbolic link", id="symlink"),
    pytest.param(lambda path: path.symlink_to(path.parent / "missing.txt"), "a symbolic link", id="dangling-symlink"),  # used to create missing.txt
    pytest.param(_hard_link, "a file moe-compress did not write", id="hard-link"),
    pytest.param(lambda path: path.write_text("my notes"), "a file moe-compress did not write", id="user-file"),
    pytest.param(lambda path: path.mkdir(), "a directory", id="directory"),
    pytest.param(_fifo, "not a regular file", id="fifo"),
])
def test_whatever_is_planted_at_the_lock_path_is_refused_untouched(plant, what, tmp_path):
    (tmp_path / "p.txt").write_text("precious")
    lock = tmp_path / ".out.lock"
    plant(lock)
    before = _snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MoECompressError, match=f"^{tmp_path}/.out.lock is {what}, where moe-compress keeps the lock of {tmp_path}/out"):
        check_output_dir(tmp_path / "out", overwrite=False)
    assert (_snapshot(tmp_path), sorted(p.name for p in tmp_path.iterdir())) == before
    assert (tmp_path / "p.txt").read_text() == "precious" and os.path.lexists(lock)


@pytest.mark.parametrize("left", ["", "{pid}@{host}"], ids=["empty", "dead-pid"])
def test_a_lock_file_left_by_a_dead_writer_is_replaced_and_removed_on_release(left, tmp_path):
    lock = tmp_path / ".out.lock"
    found = left.format(pid=_dead_pid(), host=HOST)
    lock.write_text(found)
    with open(lock) as stale:
        check_output_dir(tmp_path / "out", overwrite=False)
        assert lock.read_text() == f"{os.getpid()}@{HOST}"
        assert os.fstat(stale.fileno()).st_nlink == 0 and stale.read() == found, "the file it found is unlinked, unwritten"
    release_all()
    assert not lock.exists()


# ---- SIGKILL anywhere in a save or a replacement ----------------------------------------------
def test_a_writer_killed_anywhere_leaves_the_old_output_or_the_new_one(tmp_path, checkpoint_for_cli):
    """20 real writer processes, each SIGKILLed before a random (seeded) file-system operation:
    10 anywhere in a save into a fresh output, 10 in the replacement of an existing output with
    --overwrite (from the moment the finished checkpoint is moved into place), by
    tests/kill_driver.py. After the next run's first step the output is the old one intact (or
    still absent) or the new one complete, and nothing else is left beside it: no staging, aside
    or lock file."""
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, str(Path(__file__).with_name("kill_driver.py")), str(checkpoint_for_cli), str(out)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        def ask(command: str) -> dict:
            driver.stdin.write(command + "\n")
            driver.stdin.flush()
            answer = json.loads(driver.stdout.readline() or "null")
            assert answer is not None and "crash" not in answer, (answer, (tmp_path / "driver.log").read_text())
            return answer

        fresh = ask("save 0 0")
        versions = [_snapshot(out)]
        replace = ask("save 1 0")
        versions.append(_snapshot(out))
        steps = {"fresh": (1, fresh["steps"]), "replace": (replace["publish"] + 1, replace["steps"])}
        assert versions[0] != versions[1] and "config.json" in versions[0] and sorted(os.listdir(work)) == ["out"]
        current = 1
        rng = random.Random(20)
        outcomes = []
        for trial in range(20):
            mode = ("fresh", "replace")[trial % 2]
            if mode == "fresh":
                shutil.rmtree(out, ignore_errors=True)
                old, new = None, rng.randrange(2)
            else:
                if current is None:
                    current = rng.randrange(2)
                    assert not ask(f"save {current} 0")["killed"]
                old, new = versions[current], 1 - current
            kill_at = rng.randint(*steps[mode])
            assert ask(f"save {new} {kill_at}") == {"killed": True}, (mode, kill_at)
            assert ask("next") == {"error": None}
            after = _snapshot(out) if out.exists() else None
            outcome = "old" if after == old else "new" if after == versions[new] else "neither the old output nor the new one"
            assert outcome in ("old", "new"), f"trial {trial} ({mode}, killed before step {kill_at}): {outcome}"
            assert sorted(os.listdir(work)) == (["out"] if after is not None else []), f"debris after trial {trial}"
            current = None if after is None else versions.index(after)
            outcomes.append((mode, kill_at, outcome))
        assert {outcome for _, _, outcome in outcomes} == {"old", "new"}, outcomes
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
