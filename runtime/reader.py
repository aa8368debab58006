"""The expert reader interface and its pure-Python thread-pool implementation.

A reader takes a batch of scatter reads ``(fd, offset, buffers)`` - read ``sum(len(b))`` bytes of
``fd`` at ``offset`` into ``buffers`` in order (one ``preadv``) - and waits for the whole batch.
The native reader (``flashmoe.runtime.native_reader``) implements the same interface in C with the
GIL released for the whole wait; this pool is the fallback.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass


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
    """``preadv`` until every buffer is full: continue short reads, retry EINTR, EOF is an error."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = sum(v.nbytes for v in views)
    done = 0
    while views:
        try:
            n = os.preadv(fd, views, offset + done)
        except InterruptedError:
            continue
        except OSError as e:
            raise ReadError(
                e.errno, f"read of {total} bytes at offset {offset} from {path} failed: {e.strerror}"
            ) from None
        if n == 0:
            raise ReadError(
                errno.EIO,
                f"read of {total} bytes at offset {offset} from {path}: end of file after {done} bytes",
            )
        done += n
        while views and n >= views[0].nbytes:
            n -= views[0].nbytes
            views.pop(0)
        if n:
            views[0] = views[0][n:]


class Batch:
    """A submitted batch; ``wait()`` blocks until every read finished and raises the first error."""

    def __init__(self, futures: list[Future]):
        self._futures = futures

    def wait(self) -> None:
        first: BaseException | None = None
        for f in self._futures:
            exc = f.exception()
            if exc is not None and first is None:
                first = exc
        if first is not None:
            raise first


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


def open_for_reading(path: str, *, direct: bool = False) -> int:
    """Open a layer file for expert reads (random-access hint set; O_DIRECT when asked, Linux)."""
    flags = os.O_RDONLY
    if direct:
        if not hasattr(os, "O_DIRECT"):
            raise OSError(errno.EINVAL, "O_DIRECT is not available on this platform")
        flags |= os.O_DIRECT
    fd = os.open(path, flags)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


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
            import sys

            print(f"flashmoe: native reader unavailable ({e}); using the Python pool", file=sys.stderr)
        else:
            return NativeReader(threads=threads)
    return PythonReader(threads=threads)
