"""The expert reader interface and its pure-Python thread-pool implementation.

A reader takes a batch of scatter reads ``(fd, offset, buffers)`` - read ``sum(len(b))`` bytes of
``fd`` at ``offset`` into ``buffers`` in order (one ``preadv``) - and returns a handle: ``wait()``
for the whole batch, ``wait_for(start, stop)`` for some of its requests (the rest stay in flight),
``done()`` without blocking.
The native reader (``flashmoe.runtime.native_reader``) implements the same interface in C with the
GIL released for the whole wait; this pool is the fallback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from .. import fileio

# O_DIRECT needs offsets, lengths and buffer addresses on the device's logical block size; 4 KiB covers
# every device we know of (layouts align records to >= 4 KiB anyway).
DIRECT_ALIGNMENT = 4096
# macOS fcntl commands (<sys/fcntl.h>); Python's fcntl module does not export all of them.
_F_RDADVISE, _F_RDAHEAD, _F_NOCACHE = 44, 45, 48


class ReadError(OSError):
    """A read that failed or hit end of file; names the file, offset and length."""


@dataclass(frozen=True)
class ReadRequest:
    fd: int
    offset: int
    buffers: tuple  # writable buffers (memoryviews), filled in order
    path: str = "?"  # for error messages only

    @property
    def length(self) -> int:
        return sum(memoryview(b).nbytes for b in self.buffers)


def preadv_full(fd: int, buffers: Sequence, offset: int, path: str = "?") -> None:
    """``fileio.preadv_full`` with the reader's errors: ``ReadError`` naming the file, offset and
    length (and, for O_DIRECT, what is misaligned)."""
    try:
        fileio.preadv_full(fd, buffers, offset)
    except fileio.ShortRead as e:
        raise ReadError(
            errno.EIO,
            f"read of {e.total} bytes at offset {offset} from {path}: end of file after {e.done} bytes",
        ) from None
    except OSError as e:
        total = sum(memoryview(b).nbytes for b in buffers)
        why = direct_misalignment(fd, offset, buffers) if e.errno == errno.EINVAL else None
        if why:
            raise ReadError(
                errno.EINVAL,
                f"O_DIRECT read of {total} bytes at offset {offset} from {path}: {why}",
            ) from None
        raise ReadError(
            e.errno, f"read of {total} bytes at offset {offset} from {path} failed: {e.strerror}"
        ) from None


def direct_misalignment(
    fd: int, offset: int, views: Sequence, alignment: int = DIRECT_ALIGNMENT
) -> str | None:
    """Why an ``O_DIRECT`` read of ``views`` at ``offset`` is invalid, or None (also when not O_DIRECT)."""
    o_direct = getattr(os, "O_DIRECT", 0)
    try:
        if not o_direct or not fcntl.fcntl(fd, fcntl.F_GETFL) & o_direct:
            return None
    except OSError:
        return None
    if offset % alignment:
        return f"offset is not a multiple of {alignment}"
    import ctypes

    for i, v in enumerate(views):
        v = memoryview(v)
        if v.nbytes % alignment:
            return f"buffer {i} length {v.nbytes} is not a multiple of {alignment}"
        if not v.readonly:
            addr = ctypes.addressof(ctypes.c_char.from_buffer(v)) if v.nbytes else 0
            if addr % alignment:
                return f"buffer {i} address {addr:#x} is not {alignment}-byte aligned"
    return None


class Batch:
    """A submitted batch; ``wait()`` blocks until every read finished and raises the first error.

    ``wait_for(start, stop)`` waits for requests ``[start, stop)`` only (the rest stay in flight);
    ``done()`` and ``done_for(start, stop)`` ask without blocking.
    """

    def __init__(self, futures: list[Future]):
        self._futures = futures

    def wait(self) -> None:
        self.wait_for(0, len(self._futures))

    def wait_for(self, start: int, stop: int) -> None:
        self._check_range("wait_for", start, stop)
        first: BaseException | None = None
        for f in self._futures[start:stop]:
            exc = f.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def done_for(self, start: int, stop: int) -> bool:
        """Whether requests ``[start, stop)`` finished (does not block)."""
        self._check_range("done_for", start, stop)
        return all(f.done() for f in self._futures[start:stop])

    def _check_range(self, name: str, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self._futures):
            raise IndexError(f"{name}({start}, {stop}) on a batch of {len(self._futures)} requests")


class PythonReader:
    """Thread-pool reader: one ``os.preadv`` per request on a persistent pool."""

    kind = "python"

    def __init__(self, threads: int = 8):
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="flashmoe-io")
        self._lock = threading.Lock()

    def submit(self, requests: Sequence[ReadRequest]) -> Batch:
        return Batch(
            [self._pool.submit(preadv_full, r.fd, r.buffers, r.offset, r.path) for r in requests]
        )

    def read(self, requests: Sequence[ReadRequest]) -> None:
        """Submit and wait."""
        self.submit(requests).wait()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_for_reading(path: str, *, direct: bool = False, random: bool = True) -> int:
    """Open a layer file for expert reads.

    ``direct``: bypass the page cache (``O_DIRECT`` on Linux - reads must then be 4 KiB aligned -,
    ``F_NOCACHE`` on macOS), for cold-read experiments. ``random`` (default): no readahead
    (``POSIX_FADV_RANDOM`` / ``F_RDAHEAD`` 0): expert reads are exact, readahead only evicts.
    """
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    if direct and sys.platform != "darwin":
        if not hasattr(os, "O_DIRECT"):
            raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform")
        flags |= os.O_DIRECT
    fd = os.open(path, flags)
    try:
        if sys.platform == "darwin":
            if direct:
                fcntl.fcntl(fd, _F_NOCACHE, 1)
            if random:
                fcntl.fcntl(fd, _F_RDAHEAD, 0)
        elif random and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except BaseException:
        os.close(fd)
        raise
    return fd


def advise_willneed(fd: int, offset: int, length: int) -> None:
    """Prefetch hint: start reading ``[offset, offset + length)`` into the page cache, don't wait.

    One syscall (``POSIX_FADV_WILLNEED`` / ``F_RDADVISE``); a no-op where neither exists.
    """
    if sys.platform == "darwin":
        import struct

        # struct radvisory { off_t ra_offset; int ra_count; } (ra_count is an int: cap at 2 GiB - 1)
        fcntl.fcntl(fd, _F_RDADVISE, struct.pack("qi4x", offset, min(length, 2**31 - 1)))
    elif hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)


def advise_dontneed(fd: int, offset: int = 0, length: int = 0) -> None:
    """Drop ``[offset, offset + length)`` (0 = to the end) from the page cache (Linux; cold reads)."""
    if not hasattr(os, "posix_fadvise"):
        raise OSError(errno.ENOTSUP, "POSIX_FADV_DONTNEED is not available on this platform")
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def split_buffers(
    buffers: Sequence, plan: Sequence[tuple[int, int]]
) -> list[tuple[int, tuple[memoryview, ...]]]:
    """Slice one record's scatter ``buffers`` into the chunks of a split ``plan``.

    Returns ``(chunk_start, views)`` per chunk; ``views`` are zero-copy byte views of ``buffers``
    covering record bytes ``[start, end)``. The last chunk runs to the end of the buffers, so buffers
    that also cover the record's padding (``O_DIRECT`` reads to ``record_size``) extend it, as
    FORMAT.md says. Cost: O(chunks + buffers) slices; cache the result per slot and reuse it.
    """
    if (
        not plan
        or plan[0][0] != 0
        or any(plan[i][1] != plan[i + 1][0] for i in range(len(plan) - 1))
    ):
        raise ValueError(f"not a split plan (contiguous ranges from 0): {list(plan)}")
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(v.nbytes for v in views)
    if total < plan[-1][1]:
        raise ValueError(f"buffers hold {total} bytes, the plan needs {plan[-1][1]}")
    out: list[tuple[int, tuple[memoryview, ...]]] = []
    i, pos = 0, 0  # current buffer and the record offset where it starts
    for c, (start, end) in enumerate(plan):
        if c == len(plan) - 1:
            end = total
        chunk = []
        while pos < end:
            v = views[i]
            lo, hi = max(start, pos), min(end, pos + v.nbytes)
            if lo < hi:
                chunk.append(v if hi - lo == v.nbytes else v[lo - pos : hi - pos])
            if pos + v.nbytes > end:
                break  # the buffer continues into the next chunk
            pos += v.nbytes
            i += 1
        out.append((start, tuple(chunk)))
    return out


def split_requests(
    fd: int, record_offset: int, buffers: Sequence, plan: Sequence[tuple[int, int]], path: str = "?"
) -> list[ReadRequest]:
    """One ``ReadRequest`` per chunk of ``plan`` for the record at ``record_offset`` (see ``split_buffers``)."""
    return [
        ReadRequest(fd, record_offset + start, views, path)
        for start, views in split_buffers(buffers, plan)
    ]


def make_reader(kind: str = "auto", threads: int = 8):
    """A reader of ``kind`` "native", "python" or "auto" (native when it can be imported)."""
    if kind not in ("auto", "native", "python"):
        raise ValueError(f"unknown reader {kind!r} (auto, native, python)")
    if kind in ("auto", "native"):
        try:
            from .native_reader import NativeReader
        except ImportError as e:
            if kind == "native":
                raise RuntimeError(f"native reader unavailable: {e}") from None
            print(
                f"flashmoe: native reader unavailable ({e}); using the Python pool", file=sys.stderr
            )
        else:
            return NativeReader(threads=threads)
    return PythonReader(threads=threads)
