"""Low-level file I/O for the converter: full preads/pwrites, preallocation, errors with names."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from .. import fileio
from ..fileio import commit
from .errors import ConvertError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def preadv_full(fd: int, buffers: Sequence[memoryview], offset: int, path: object) -> None:
    """Fill ``buffers`` in order from ``fd`` at ``offset``; end of file is an error naming ``path``."""
    try:
        fileio.preadv_full(fd, buffers, offset)
    except fileio.ShortRead as e:
        raise ConvertError(
            path,
            f"truncated: end of file at byte {offset + e.done} while reading {e.total} bytes at "
            f"offset {offset} (the file changed or is shorter than its header says)",
        ) from None


def pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        try:
            n = os.pwrite(fd, data, offset)
        except InterruptedError:
            continue
        data = data[n:]
        offset += n


def open_for_write(path: Path, size: int) -> int:
    """Create (truncate) ``path`` and reserve ``size`` bytes, so a full disk fails up front."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno in NO_SPACE:
                    raise
                os.ftruncate(fd, size)  # filesystems without fallocate
        else:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def finish(fd: int, partial: Path, final: Path) -> None:
    """Commit an output file (``flashmoe.fileio.commit``): its written pages are not needed again
    soon, so they leave the page cache instead of crowding it."""
    commit(fd, partial, final, drop_cache=True)


def os_error(e: OSError, path: object, needed: int | None = None) -> ConvertError:
    """A one-line ConvertError for an OSError that happened on ``path``."""
    if e.errno in NO_SPACE:
        extra = f" (the layout needs {needed:,} bytes in all)" if needed else ""
        return ConvertError(path, f"no space left on device{extra}")
    return ConvertError(getattr(e, "filename", None) or path, e.strerror or str(e))
