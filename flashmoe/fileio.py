"""File I/O every part of flashmoe shares: full scatter reads and atomic, durable replacement.

``preadv_full`` is the one read loop (short reads continued, EINTR retried, end of file an
error); the converter, the verifier and the runtime's Python reader wrap it with their own error
messages (the native reader has the same loop in C). Replacement follows one rule: write a
temporary file in the target's directory, fsync it, rename it over the target, fsync the
directory. After a crash the target is either the old file or the complete new one, never a torn
mix, and a finished rename survives power loss.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path


class ShortRead(EOFError):
    """End of file before the buffers were full: ``done`` of ``total`` bytes read at ``offset``."""

    def __init__(self, offset: int, done: int, total: int):
        super().__init__(f"end of file after {done} of {total} bytes at offset {offset}")
        self.offset, self.done, self.total = offset, done, total


def preadv_full(fd: int, buffers: Sequence, offset: int) -> None:
    """Fill ``buffers`` in order from ``fd`` at ``offset`` with ``preadv``.

    Continues short reads and retries EINTR; raises ``ShortRead`` at end of file and lets any
    other ``OSError`` through (callers name the file).
    """
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(v.nbytes for v in views)
    done = 0
    while views:
        try:
            n = os.preadv(fd, views, offset + done)
        except InterruptedError:
            continue
        if n == 0:
            raise ShortRead(offset, done, total)
        done += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and creations in directory ``path`` durable (best effort: some filesystems
    and platforms cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(fd: int, temp: str | os.PathLike, final: str | os.PathLike, *, drop_cache=False) -> None:
    """Finish a file written through ``fd`` under the name ``temp``: fsync and close it, rename it
    to ``final`` (same directory) and fsync the directory.

    ``drop_cache``: once the data is on disk, evict its pages from the page cache (Linux), for
    large files that will not be read again soon.
    """
    try:
        os.fsync(fd)
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    rename(temp, final)


def rename(temp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename ``temp`` (a file or directory whose content is already durable) to ``final`` in the
    same directory, and fsync that directory so the rename survives a crash."""
    os.replace(temp, final)
    fsync_dir(Path(final).parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically and durably.

    The temporary file has a unique name (``.NAME.XXXXXXXX.tmp`` beside ``path``), so concurrent
    writers of one path never write into each other's file; the last rename wins. It is removed
    if anything fails.
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view.nbytes:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make a shared layout unreadable to others
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    try:
        commit(fd, temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
