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
    at once instead of replacing the first one's result. The lock file is opened without
    following symlinks and written only by the process that created it: a link or file
    planted at its name (`ln -s ~/thesis.tex .out.lock`) is refused, never written into.
  * Staging and aside directories carry the writer's pid and host in their names and, first
    thing inside, a marker file saying the same, so stale ones (their process is dead) are
    recognised and cleaned by the next run. A directory without our marker is never removed,
    whatever its name; nothing else in the parent directory is ever touched.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

from ..errors import MoECompressError, warn
from .locate import BUNDLED_MODELS

P = ParamSpec("P")
R = TypeVar("R")
HOST = socket.gethostname()
#: .<output name>.<kind>-<pid>@<host>-<token>
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>[a-z]+)-(?P<pid>\d+)@(?P<host>.+)-(?P<token>[0-9a-f]{8})$")
ASIDE = "old"  # the kind of a replaced output waiting to be deleted
#: The file inside each staging or aside directory that proves this tool made it, and for whom.
MARKER = ".moe_compress_staging.json"
#: What one of our lock files holds: its writer, or nothing in the instant after its creation.
_HOLDER = re.compile(rb"^(\d+@\S+)?$")
_LOCK_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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
    """An exclusive flock on a lock file beside an output, created by this process.

    The file is never opened through a symlink, and written (our pid) only when this process
    created it. One left by a dead writer is unlinked and created anew; anything else at its
    name -- a symlink, a directory, a file we did not write -- is refused, untouched.
    """

    def __init__(self, out: Path):
        self.out = out
        self.path = _lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd, created = os.open(self.path, _LOCK_FLAGS | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                fd, created = self._open_existing(), False
            except OSError as exc:
                raise write_error(self.out.parent, exc, "create the output in") from None
            if fd is None:
                continue
            try:
                if self._take(fd, created):
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def _open_existing(self) -> int | None:
        """The existing lock file, opened without following a symlink (None: it just went away)."""
        try:
            fd = os.open(self.path, _LOCK_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise self._in_the_way() from None
            raise write_error(self.out.parent, exc, "create the output in") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._in_the_way()
        return fd

    def _take(self, fd: int, created: bool) -> bool:
        """Lock `fd`; True once it is the lock file at our path, created by us and holding our pid."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            written = os.read(fd, 200).strip()
            holder = written.decode() if written and _HOLDER.match(written) else "unknown"
            raise MoECompressError(
                f"another moe-compress run (pid {holder}) is writing {self.out}; wait for it to finish or choose another --out."
            ) from None
        # The previous holder may have removed (or someone replaced) the file between our open
        # and our lock: then we hold a lock on a file no longer at our path and must start again.
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
        except FileNotFoundError:
            same = False
        if not same:
            return False
        if created:
            os.write(fd, f"{os.getpid()}@{HOST}".encode())
            return True
        if os.fstat(fd).st_size > 200 or not _HOLDER.match(os.read(fd, 201).strip()):
            raise self._in_the_way()
        self.path.unlink()  # a dead writer's (we hold its lock): replace it with one of our own
        return False

    def _in_the_way(self) -> MoECompressError:
        try:
            mode = os.lstat(self.path).st_mode
        except OSError:
            mode = 0
        what = ("a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
                else "a file moe-compress did not write" if stat.S_ISREG(mode) else "not a regular file")
        return MoECompressError(
            f"{self.path} is {what}, where moe-compress keeps the lock of {self.out}; it was left untouched. "
            "Move it away or choose another --out."
        )

    def release(self) -> None:
        if self.fd is None:
            return
        try:  # while still locked: no one else can be holding it
            if os.path.samestat(os.fstat(self.fd), os.lstat(self.path)):
                self.path.unlink()
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
