"""One writer per output: an exclusive `flock` on `.<name>.lock` beside the output.

The lock is held from the first check until the output is published (or the process ends), so
a second run fails at once instead of replacing the first one's result. The lock file is
opened without following symlinks and written only by the process that created it: a link or
file planted at its name (`ln -s ~/thesis.tex .out.lock`) is refused, never written into.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import ParamSpec, TypeVar

from ..errors import MoECompressError, param
from .write_error import write_error

P = ParamSpec("P")
R = TypeVar("R")
HOST = socket.gethostname()
#: What one of our lock files holds: its writer, or nothing in the instant after its creation.
_HOLDER = re.compile(rb"^(\d+@\S+)?$")
_LOCK_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


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
                f"another moe-compress run (pid {holder}) is writing {self.out}; wait for it to finish or choose another {param('out')}."
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
            f"Move it away or choose another {param('out')}."
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
