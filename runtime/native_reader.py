"""The native expert reader: ``flashmoe.runtime._native_reader`` (C, ``runtime/_native/reader.c``).

Same interface as ``reader.PythonReader``: a persistent pthread pool; ``submit`` turns the whole batch
into one C array of iovecs (holding the buffer views until the batch ends) and queues it; ``wait``
releases the GIL until every read finished. No Python code runs per read.

Importing this module raises ImportError when the extension was not built, or when the environment
variable ``FLASHMOE_DISABLE_NATIVE`` is set (not "" or "0"); ``reader.make_reader("auto")`` then falls
back to the Python pool with a one-line notice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .reader import DIRECT_ALIGNMENT, ReadRequest

if os.environ.get("FLASHMOE_DISABLE_NATIVE", "") not in ("", "0"):
    raise ImportError("disabled by FLASHMOE_DISABLE_NATIVE")
try:
    from . import _native_reader as _ext
except ImportError as e:
    raise ImportError(
        f"extension flashmoe.runtime._native_reader not built or not loadable: {e}"
    ) from e

__all__ = ["NativeReader", "preadv_loop"]

preadv_loop = _ext.preadv_loop  # no-pool baseline for benchmarks


class NativeReader:
    """Native thread-pool reader: one ``preadv`` per request on persistent pthreads.

    ``submit(requests)`` returns a batch with ``wait()`` (GIL released; raises ``ReadError`` naming
    errno, path, offset and length; end of file is an error), ``wait_for(start, stop)``, and
    ``done()`` / ``done_for(start, stop)`` (non-blocking). Requests on an
    ``O_DIRECT`` descriptor are checked for ``direct_alignment`` (offset, every buffer's address and
    length) at submit; a misaligned one raises ``ReadError`` (EINVAL) saying which, and nothing of the
    batch is issued. Requests may also be plain ``(fd, offset, buffers, path)`` tuples (cheaper).
    """

    kind = "native"

    def __init__(self, threads: int = 8, *, direct_alignment: int = DIRECT_ALIGNMENT):
        self.threads = threads
        self._pool = _ext.Pool(threads, direct_alignment)
        self.submit = self._pool.submit  # bound C method: no Python frame per batch

    def submit(self, requests: Sequence[ReadRequest]):  # noqa: F811 - replaced per instance
        return self._pool.submit(requests)

    def set_device(self, context: int) -> None:
        """Run requests' device copies (a fifth element: packed uint64 (device, host, bytes)
        triples) in this CUDA context, each right after its read, on the worker's own stream."""
        self._pool.set_device(context)

    def read(self, requests: Sequence[ReadRequest]) -> None:
        """Submit and wait."""
        self._pool.submit(requests).wait()

    def close(self) -> None:
        """Finish queued batches and stop the workers (idempotent)."""
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
