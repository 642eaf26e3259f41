"""A file written around the page cache (O_DIRECT), its disk writes done by a thread of its own.

Why: writing a checkpoint through the page cache costs a kernel copy of every byte into freshly
allocated cache pages, and on the virtual machines our users run in that copy is the slow part:
measured here (2 cores, ext4 on virtio), buffered writes of 2 GiB ran at 0.42 GB/s, all of it
system CPU taken from the calibration forward, against 1.6 GB/s and almost no CPU for O_DIRECT
(`dd bs=64M` with and without `oflag=direct`). The dirty pages also count against a container's
memory limit until the kernel writes them back. So the bytes are copied once, in user space,
into a few page-aligned buffers (O_DIRECT needs aligned memory, offsets and lengths), and a
thread hands full buffers to the disk while the caller produces the next ones; `os.pwrite`
releases the GIL, so the disk's time hides under the caller's work.

Where O_DIRECT is not offered (tmpfs, macOS) or a write is refused for its alignment, the file
is written through the page cache as usual: the same bytes either way. The last buffer is padded
to the alignment and the file truncated to its length afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading
from pathlib import Path

#: Offsets and lengths of O_DIRECT writes are multiples of this (the largest logical block size in use).
ALIGNMENT = 4096
#: Size of each buffer: big enough that a write costs the disk's bandwidth, not its latency (4 MiB writes
#: already ran at 2.1 GB/s here, `dd oflag=direct`), small enough to cost little memory.
CHUNK = 8 * 2**20
#: Buffers per file: the caller fills one while the thread writes the others.
DEPTH = 4
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectFile:
    """A write-only binary file (created or truncated): `write` copies, the thread writes; `close` waits.

    `close(wait=False)` returns at once; `wait()` later blocks until the bytes are on disk (written, not
    synced) and raises the thread's error, if any. Nothing is hidden: an error writing a buffer is raised
    by the next `write`, `close` or `wait`.
    """

    def __init__(self, path: str | Path, chunk: int = CHUNK, depth: int = DEPTH, direct: bool = True):
        if chunk % ALIGNMENT:
            raise ValueError(f"chunk must be a multiple of {ALIGNMENT} bytes")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and bool(_O_DIRECT)
        try:
            self._fd = os.open(path, flags | (_O_DIRECT if self.direct else 0), 0o666)
        except OSError as error:  # O_DIRECT refused at open (tmpfs): written through the page cache
            if not self.direct or error.errno != errno.EINVAL:
                raise
            self.direct = False
            self._fd = os.open(path, flags, 0o666)
        self._chunk = chunk
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(depth):
            self._free.put(mmap.mmap(-1, chunk))  # anonymous maps are page aligned, as O_DIRECT wants
        self._full: queue.SimpleQueue[tuple[mmap.mmap, int] | None] = queue.SimpleQueue()
        self._buffer: mmap.mmap | None = self._free.get()
        self._filled = 0
        self.size = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"write {Path(path).name}", daemon=True)
        self._thread.start()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            self._raise_error()
            if self._buffer is None:
                raise ValueError("write to a closed file")
            take = min(len(view) - written, self._chunk - self._filled)
            self._buffer[self._filled : self._filled + take] = view[written : written + take]
            self._filled += take
            written += take
            if self._filled == self._chunk:
                self._submit()
                self._buffer = self._free.get()
        self.size += written
        return written

    def close(self, wait: bool = True) -> None:
        if self._buffer is not None:
            if self._filled:
                self._submit()
            self._buffer = None
            self._full.put(None)
        if wait:
            self.wait()

    def wait(self) -> None:
        self._thread.join()
        self._raise_error()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close()

    def _submit(self) -> None:
        assert self._buffer is not None
        self._full.put((self._buffer, self._filled))
        self._buffer, self._filled = None, 0

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """The thread: writes the buffers in order, then cuts the last one's padding and closes the file."""
        offset = 0
        while (item := self._full.get()) is not None:
            buffer, length = item
            if self._error is None:
                try:
                    self._write_at(buffer, length, offset)
                except BaseException as error:  # handed to the caller, who raises it; later buffers are dropped
                    self._error = error
            offset += length
            self._free.put(buffer)  # a writer waiting for a buffer goes on (to its error, if one came)
        try:
            if self._error is None and offset % ALIGNMENT:
                os.ftruncate(self._fd, offset)
        except OSError as error:
            self._error = error
        finally:
            os.close(self._fd)
            while not self._free.empty():  # the file is done: its buffers go back to the system with their last reference
                self._free.get()

    def _write_at(self, buffer: mmap.mmap, length: int, offset: int) -> None:
        padded = -(-length // ALIGNMENT) * ALIGNMENT if self.direct else length
        if padded > length:
            buffer[length:padded] = bytes(padded - length)
        view = memoryview(buffer)[:padded]
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self._fd, view[done:], offset + done)
            except OSError as error:
                if not self.direct or error.errno != errno.EINVAL:
                    raise
                self._buffered()  # this file system took O_DIRECT at open but refuses the write
                view = view[:length]

    def _buffered(self) -> None:
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self.direct = False

