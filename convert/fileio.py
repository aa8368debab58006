"""Low-level file I/O for the converter: full preads/pwrites, preallocation, errors with names.

Layer files are written in whole aligned records with ``O_DIRECT`` where the OS has it (Linux):
the bytes go from the staging buffer to the disk without being copied into the page cache, which
the conversion does not read back and would evict at the end anyway. That copy was the converter's
largest CPU cost after sha256, and CPU is what a conversion streamed from the Hub competes for with
the download. A filesystem that refuses direct I/O gets ordinary writes.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

from .. import fileio
from ..fileio import commit
from .errors import ConvertError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the OS has none (macOS): ordinary writes


def aligned_buffer(size: int) -> memoryview:
    """A zero-filled, page-aligned buffer of ``size`` bytes (direct I/O needs aligned memory)."""
    return memoryview(mmap.mmap(-1, size))


def preadv_full(fd: int, buffers: Sequence[memoryview], offset: int, path: object) -> None:
    """Fill ``buffers`` in order from ``fd`` at ``offset``; end of file is an error naming ``path``."""
    try:
        try:
            fileio.preadv_full(fd, buffers, offset)
        except OSError as e:  # direct I/O refused (an unaligned read): read the ordinary way
            if e.errno != errno.EINVAL or not _drop_direct(fd):
                raise
            fileio.preadv_full(fd, buffers, offset)
    except fileio.ShortRead as e:
        raise ConvertError(
            path,
            f"truncated: end of file at byte {offset + e.done} while reading {e.total} bytes at "
            f"offset {offset} (the file changed or is shorter than its header says)",
        ) from None


def pwrite_full(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``. On a descriptor opened for direct I/O, a write the
    filesystem refuses as unaligned (EINVAL) is retried as an ordinary write."""
    while data.nbytes:
        try:
            n = os.pwrite(fd, data, offset)
        except InterruptedError:
            continue
        except OSError as e:
            if e.errno != errno.EINVAL or not _drop_direct(fd):
                raise
            continue
        data = data[n:]
        offset += n


def _drop_direct(fd: int) -> bool:
    """Turn direct I/O off on ``fd``; False if it was not on."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not DIRECT or not flags & DIRECT:
        return False
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~DIRECT)
    return True


def open_direct(path: Path, flags: int) -> int:
    """``os.open(path, flags)`` with direct I/O where the filesystem allows it (see the module
    docstring); reads and writes through it need ``aligned_buffer`` memory and offsets and
    lengths that are multiples of 4096, else ``pwrite_full`` falls back to ordinary writes."""
    flags |= getattr(os, "O_CLOEXEC", 0)
    if DIRECT:
        try:
            return os.open(path, flags | DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no direct I/O
                raise
    return os.open(path, flags, 0o644)


def open_for_write(path: Path, size: int, direct: bool = False) -> int:
    """Create (truncate) ``path`` and reserve ``size`` bytes, so a full disk fails up front.
    ``direct``: open it for direct I/O (``open_direct``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if direct:
        fd = open_direct(path, flags)
    else:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
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
