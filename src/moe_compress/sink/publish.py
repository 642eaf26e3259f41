"""Publish output directories without ever losing data.

Rules, each from a way users lost data:
  * An output may not be, contain or lie inside an input (the model, a plan, a recipe), nor be
    the current directory or one of its parents (`--out . --overwrite` used to delete the
    working directory, input model included).
  * `--overwrite` replaces only a checkpoint directory (one with a config.json) or an empty
    one; any other existing path is left alone and the run is refused.
  * Everything is written into a staging directory beside the output and renamed into place.
    An existing output is first renamed aside and deleted only once the new one is in place;
    a process killed between the two renames leaves the old checkpoint intact in the aside
    directory, and the next run against the same output puts it back.
  * One writer per output: an exclusive lock beside it, held from the first check until the
    output is published (`output_lock`).
  * Staging and aside directories are marked as this tool's and their writer's, so the next run
    removes only those of dead writers, and nothing else (`staging`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import MoECompressError, param
from ..source.locate import BUNDLED_MODELS
from .output_lock import lock_output, release_output
from .staging import ASIDE, clean_stale, discard_staging, staging_dir
from .write_error import write_error

OUT, OVERWRITE = param("out"), param("overwrite")


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _refuse_unsafe_target(out: Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse outputs whose replacement could delete the working directory or an input."""
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, target):
        raise MoECompressError(
            f"{OUT} {out} is the current directory or one of its parents; writing there would replace your working "
            f"files. Choose a new directory for {OUT}, e.g. compressed/."
        )
    for given in inputs:
        if given is None:
            continue
        source = Path(given) if Path(given).exists() else BUNDLED_MODELS / str(given)
        if not source.exists():
            continue
        source = source.resolve()
        if _is_within(source, target) or _is_within(target, source):
            relation = "is" if source == target else "contains" if _is_within(source, target) else "is inside"
            raise MoECompressError(f"{OUT} {out} {relation} the input {given}; choose an output directory outside it.")


def _replaceable(out: Path) -> bool:
    """An empty directory or a checkpoint directory: what --overwrite may replace."""
    return out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or (out / "config.json").is_file())


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise MoECompressError(f"output {out} exists and is not a directory; choose another {OUT}.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise MoECompressError(f"output {out} exists and is not an empty directory; choose another {OUT} or pass {OVERWRITE}.")
    if not _replaceable(out):
        raise MoECompressError(
            f"output {out} holds files but no config.json, so it is not a checkpoint: {OVERWRITE} replaces only "
            f"checkpoint directories. Choose another {OUT} or empty it yourself."
        )


def validate_output_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """The refusals of `check_output_dir`, without creating, locking or cleaning anything (`--dry-run`)."""
    out = Path(out)
    _refuse_unsafe_target(out, inputs)
    if out.parent.exists() and not out.parent.is_dir():
        raise MoECompressError(f"cannot create output {out}: {out.parent} is a file, not a directory.")
    _refuse_existing(out, overwrite)


def check_output_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Fail before any work is done if writing `out` would be unsafe; then hold its lock.

    `inputs` are paths the run reads (model directory, plan, recipe): the output may not be,
    contain or lie inside any of them. Stale staging directories of dead writers are cleaned.
    """
    out = Path(out)
    _refuse_unsafe_target(out, inputs)
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise MoECompressError(f"cannot create output {out}: {parent} is a file, not a directory.")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(parent, exc, "create") from None
    lock_output(out)
    clean_stale(out)
    _refuse_existing(out, overwrite)


def make_readable(directory: Path) -> None:
    """Let everyone read (and enter) what a run wrote: a checkpoint is made to be shared, served by
    another user's inference server, or copied by a colleague -- a restrictive umask (077 makes
    files 0600) must not make it unreadable. Write permission stays as the umask left it."""
    for root, _, files in os.walk(directory):  # every directory is a `root` once
        os.chmod(root, os.stat(root).st_mode | 0o555)
        for name in files:
            path = Path(root, name)
            if not path.is_symlink():
                os.chmod(path, path.stat().st_mode | 0o444)


def publish(staged: Path, out: Path, overwrite: bool = True) -> Path:
    """Move a finished directory into place, replacing `out` only if allowed and replaceable.

    The old output is renamed aside first and deleted only after the new one is in place;
    everything in it is made readable by all first (`make_readable`).
    """
    out = Path(out)
    make_readable(staged)
    _refuse_unsafe_target(out)
    lock_output(out)
    try:
        if out.exists() or out.is_symlink():
            if not (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):  # an empty directory is always replaceable
                if not overwrite:
                    raise MoECompressError(f"output {out} appeared while this run was working; choose another {OUT} or pass {OVERWRITE}.")
                if not _replaceable(out):
                    raise MoECompressError(f"output {out} is no longer a checkpoint directory; refusing to replace it. Choose another {OUT}.")
            aside = staging_dir(out, ASIDE)
            held = aside / out.name
            try:
                out.rename(held)
                try:
                    staged.rename(out)
                except BaseException:
                    held.rename(out)
                    raise
            except BaseException:
                if not os.path.lexists(held):  # the old output is back in place (or never left it)
                    discard_staging(aside)
                raise
            discard_staging(aside)
        else:
            staged.rename(out)
    except OSError as exc:
        raise write_error(out, exc) from None
    release_output(out)
    return out
