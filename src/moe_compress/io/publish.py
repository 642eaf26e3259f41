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
  * One writer per output: an exclusive `flock` on `.<name>.lock` beside the output, held from
    the first check until the output is published (or the process ends). A second run fails
    at once instead of replacing the first one's result.
  * Staging and aside directories carry the writer's pid and host in their names, so stale
    ones (their process is dead) are recognised and cleaned by the next run; nothing else in
    the parent directory is ever touched.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

from ..errors import MoECompressError, warn
from .load import BUNDLED_MODELS

P = ParamSpec("P")
R = TypeVar("R")
HOST = socket.gethostname()
#: .<output name>.<kind>-<pid>@<host>-<token>
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>[a-z]+)-(?P<pid>\d+)@(?P<host>.+)-(?P<token>[0-9a-f]{8})$")
ASIDE = "old"  # the kind of a replaced output waiting to be deleted


def staging_dir(out: str | Path, kind: str) -> Path:
    """A fresh sibling path of `out` for this process to stage into (not created)."""
    out = Path(out)
    return out.parent / f".{out.name}.{kind}-{os.getpid()}@{HOST}-{secrets.token_hex(4)}"


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


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


def write_error(path: Path, exc: Exception, action: str = "write") -> MoECompressError:
    """A one-line error for a failed write (OSError, or safetensors' wrapper of one)."""
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)", str(exc))):
        code = int(found[1])
    reason = (exc.strerror if isinstance(exc, OSError) else None) or (os.strerror(code) if code else str(exc).splitlines()[0])
    hint = {
        errno.ENOSPC: "free some space or choose another --out",
        errno.EDQUOT: "free some space or choose another --out",
        errno.EROFS: "the file system is read-only; choose another --out",
        errno.EACCES: "you lack permission there; choose another --out",
        errno.EPERM: "you lack permission there; choose another --out",
    }.get(code, "check the path and choose another --out if needed")
    return MoECompressError(f"cannot {action} {path}: {reason}; {hint}.")


class _OutputLock:
    """An exclusive flock on the lock file beside an output, for this process."""

    def __init__(self, out: Path):
        self.out = out
        self.path = _lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise write_error(self.out.parent, exc, "create the output in") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise MoECompressError(
                    f"another moe-compress run (pid {holder}) is writing {self.out}; wait for it to finish or choose another --out."
                ) from None
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a deleted file and must take the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}@{HOST}".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: no one else can be holding it
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


_HELD: dict[Path, _OutputLock] = {}


def _key(out: Path) -> Path:
    return Path(os.path.abspath(out))


def lock_output(out: str | Path) -> None:
    """Hold the output's lock for this process (re-entrant: a second call is a no-op).

    Under torchrun only rank 0 writes, so only rank 0 takes the lock.
    """
    from ..distributed import rank

    if rank() != 0:
        return
    key = _key(Path(out))
    if key not in _HELD:
        lock = _OutputLock(key)
        lock.acquire()
        _HELD[key] = lock


def release_output(out: str | Path) -> None:
    lock = _HELD.pop(_key(Path(out)), None)
    if lock is not None:
        lock.release()


def release_all() -> None:
    """Give up every output lock this process holds (the CLI does this when a command ends)."""
    for key in list(_HELD):
        _HELD.pop(key).release()


atexit.register(release_all)


@contextmanager
def output_locks(release_on_success: bool = True) -> Iterator[None]:
    """Give back the output locks taken inside the block when it fails (and, by default, when it
    ends); locks held before it are kept."""
    held = set(_HELD)
    try:
        yield
    except BaseException:
        _release_since(held)
        raise
    if release_on_success:
        _release_since(held)


def _release_since(held: set[Path]) -> None:
    for key in set(_HELD) - held:
        release_output(key)


def releases_outputs(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate an API entry point: output locks it took are given back if it fails.

    A successful call gives its locks back when it publishes; a failing one would otherwise
    keep them (and their lock files) until the process ends.
    """

    @wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with output_locks(release_on_success=False):
            return function(*args, **kwargs)

    return wrapper


def _clean_stale(out: Path) -> None:
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
        if match["kind"] == ASIDE:
            asides.append(entry)
        else:
            shutil.rmtree(entry, ignore_errors=True)
    for entry in asides:
        if not out.exists() and not out.is_symlink():
            entry.rename(out)
            warn(f"restored {out} from {entry.name}: an earlier run was interrupted while replacing it.")
        elif (out / "config.json").is_file():  # the replacement was published; only deleting the old one was cut short
            shutil.rmtree(entry, ignore_errors=True)
        else:
            warn(f"{entry} holds the checkpoint an interrupted run was replacing, and {out} is not a checkpoint; both are left as they are.")


def _is_within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _refuse_unsafe_target(out: Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse outputs whose replacement could delete the working directory or an input."""
    target = out.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, target):
        raise MoECompressError(
            f"--out {out} is the current directory or one of its parents; writing there would replace your working "
            "files. Choose a new directory, e.g. --out compressed/."
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
            raise MoECompressError(f"--out {out} {relation} the input {given}; choose an output directory outside it.")


def _replaceable(out: Path) -> bool:
    """An empty directory or a checkpoint directory: what --overwrite may replace."""
    return out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or (out / "config.json").is_file())


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise MoECompressError(f"output {out} exists and is not a directory; choose another --out.")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise MoECompressError(f"output {out} exists and is not an empty directory; choose another --out or pass --overwrite.")
    if not _replaceable(out):
        raise MoECompressError(
            f"output {out} holds files but no config.json, so it is not a checkpoint: --overwrite replaces only "
            "checkpoint directories. Choose another --out or empty it yourself."
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
    _clean_stale(out)
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
                    raise MoECompressError(f"output {out} appeared while this run was working; choose another --out or pass --overwrite.")
                if not _replaceable(out):
                    raise MoECompressError(f"output {out} is no longer a checkpoint directory; refusing to replace it. Choose another --out.")
            aside = staging_dir(out, ASIDE)
            out.rename(aside)
            try:
                staged.rename(out)
            except BaseException:
                aside.rename(out)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            staged.rename(out)
    except OSError as exc:
        raise write_error(out, exc) from None
    release_output(out)
    return out
