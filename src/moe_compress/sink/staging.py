"""Staging and aside directories beside an output, and the cleanup of those a dead writer left.

Staging and aside directories carry the writer's pid and host in their names and, first thing
inside, a marker file saying the same, so stale ones (their process is dead) are recognised and
cleaned by the next run. A directory without our marker is never removed, whatever its name;
nothing else in the parent directory is ever touched. An output a killed run had moved aside
is put back.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import stat
import time
from pathlib import Path

from ..errors import warn
from .output_lock import HOST
from .write_error import write_error

#: .<output name>.<kind>-<pid>@<host>-<token>
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>[a-z]+)-(?P<pid>\d+)@(?P<host>.+)-(?P<token>[0-9a-f]{8})$")
ASIDE = "old"  # the kind of a replaced output waiting to be deleted
#: The file inside each staging or aside directory that proves this tool made it, and for whom.
MARKER = ".moe_compress_staging.json"


def staging_dir(out: str | Path, kind: str) -> Path:
    """Create a fresh sibling directory of `out` for this process to work in, marked as ours.

    The marker (pid, host, kind, output) is written before anything else goes in: cleanup
    removes only marked directories of dead writers, never a user's directory that merely
    has such a name. Stage a checkpoint in a subdirectory (the marker must not be published
    with it) and end with `discard_staging`.
    """
    out = Path(out)
    path = out.parent / f".{out.name}.{kind}-{os.getpid()}@{HOST}-{secrets.token_hex(4)}"
    marker = {"pid": os.getpid(), "host": HOST, "kind": kind, "output": out.name, "created": time.time()}
    try:
        path.mkdir()
        fd = os.open(path / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, json.dumps(marker).encode())
        finally:
            os.close(fd)
    except OSError as exc:
        discard_staging(path)
        raise write_error(out, exc) from None
    return path


def discard_staging(path: Path) -> None:
    """Remove a staging directory: its contents, then its marker, then itself.

    In that order a run killed part-way leaves a directory that is still marked (or empty),
    which the next run recognises and removes; never an unmarked remnant it must leave alone.
    """
    try:
        entries = list(path.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    try:
        if os.listdir(path) == [MARKER]:
            (path / MARKER).unlink()
        path.rmdir()
    except OSError:
        pass


def _is_ours(entry: Path, staged: re.Match) -> bool:
    """Whether `entry` is a directory whose marker names the writer its name names."""
    marker = entry / MARKER
    try:
        if not stat.S_ISDIR(os.lstat(entry).st_mode) or not stat.S_ISREG((found := os.lstat(marker)).st_mode) or found.st_size > 4096:
            return False
        written = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return False
    expected = {"pid": int(staged["pid"]), "host": staged["host"], "kind": staged["kind"], "output": staged["name"]}
    return isinstance(written, dict) and all(written.get(key) == value for key, value in expected.items())


def _holds_nothing(entry: Path) -> bool:
    """An empty directory, or one holding only an empty marker: what a run killed between creating
    a staging directory and writing its marker leaves. Removing it loses nothing."""
    try:
        if not stat.S_ISDIR(os.lstat(entry).st_mode):
            return False
        names = os.listdir(entry)
        return not names or names == [MARKER] and stat.S_ISREG((marker := os.lstat(entry / MARKER)).st_mode) and marker.st_size == 0
    except OSError:
        return False


def _process_alive(pid: int, host: str) -> bool:
    """Whether the writer may still be running (always True for another host: we cannot tell)."""
    if host != HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> None:
    """Remove staging directories of dead writers of `out`; put back an output they moved aside.

    Called with the output's lock held, so no live writer of this output exists.
    """
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    asides = []
    for entry in entries:
        match = _STAGED.match(entry.name)
        if not match or match["name"] != out.name or _process_alive(int(match["pid"]), match["host"]):
            continue
        if not _is_ours(entry, match):
            if _holds_nothing(entry):
                discard_staging(entry)
        elif match["kind"] == ASIDE:
            asides.append(entry)
        else:
            discard_staging(entry)
    for entry in asides:
        held = entry / out.name
        if not os.path.lexists(held):  # killed before the old output was moved in: nothing to restore
            discard_staging(entry)
        elif not out.exists() and not out.is_symlink():
            held.rename(out)
            discard_staging(entry)
            warn(f"restored {out} from {entry.name}: an earlier run was interrupted while replacing it.")
        elif (out / "config.json").is_file():  # the replacement was published; only deleting the old one was cut short
            discard_staging(entry)
        else:
            warn(f"{held} holds the checkpoint an interrupted run was replacing, and {out} is not a checkpoint; both are left as they are.")
