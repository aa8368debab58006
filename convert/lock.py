"""An exclusive OS lock on a conversion's output folder, held for the whole run.

Two conversions writing into one folder would each resume the other's unfinished files and one of
them could write an index over a layer file the other zeroed. ``output_lock`` takes
``fcntl.flock`` on ``OUT/.flashmoe-convert.lock``; a second run fails at once with one line.
The lock goes away with the process (even on SIGKILL), so a stale lock file never blocks a rerun.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError

LOCK_FILE = ".flashmoe-convert.lock"


def _open_locked(path: Path, out: Path) -> int:
    """Open and lock ``path``; retry if it was unlinked (by a finishing run) while we waited."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConvertError(
                out,
                "another flashmoe-convert is writing into this folder (it holds "
                f"{LOCK_FILE}); wait for it to finish or choose another output directory",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            st = os.stat(path)
            mine = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the conversion lock of ``out`` (created if missing) for the duration."""
    if out.exists() and not out.is_dir():
        raise ConvertError(out, "exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = _open_locked(path, out)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        try:
            os.unlink(path)  # while still locked: a waiter that opened it retries on a new file
        except OSError:
            pass
        os.close(fd)
