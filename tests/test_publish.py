"""Publishing outputs never loses data: unsafe targets, replacement, a second writer, stale staging."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_compress import MoECompressError
from moe_compress.cli import app
from moe_compress.io import publish as publishing
from moe_compress.io.publish import check_output_dir, publish, release_all, staging_dir
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
    new = _checkpoint_dir(staging_dir(out, "partial"), "new")
    publish(new, out)
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no aside, staging or lock file is left behind"


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
    assert len(asides) == 1 and _snapshot(asides[0]) == old, "the old checkpoint is intact"
    # The next run against the same output puts it back before doing anything else.
    with pytest.raises(MoECompressError, match="--overwrite"):
        check_output_dir(out, overwrite=False)
    assert _snapshot(out) == old
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.old-")]


def test_stale_staging_of_dead_writers_is_cleaned_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}@{publishing.HOST}-0123abcd"
    live = tmp_path / f".out.partial-{os.getpid()}@{publishing.HOST}-4567cdef"
    elsewhere = tmp_path / f".out.recipe-{dead}@another-host-89abcdef"
    other_output = tmp_path / f".other.partial-{dead}@{publishing.HOST}-0123abcd"
    mine = tmp_path / ".out.partial-user-notes"
    for path in (stale, live, elsewhere, other_output, mine):
        path.mkdir()
        (path / "f").write_text("x")
    check_output_dir(out, overwrite=False)
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and other_output.exists() and mine.exists()


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
    dead = _dead_pid()
    aside = _checkpoint_dir(tmp_path / f".out.old-{dead}@{publishing.HOST}-0123abcd", "old")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's, made after the crash")
    with pytest.raises(MoECompressError, match="not a checkpoint"):
        check_output_dir(out, overwrite=True)
    assert (aside / "config.json").read_text() == "old" and (out / "notes.txt").is_file()
    assert "both are left as they are" in capsys.readouterr().err
