"""Device residency for expert slots on MLX's CUDA backend (found at run time; absent elsewhere).

On CUDA, MLX arrays live in managed memory. A slot written by the host (``preadv``) is migrated to
the GPU page by page on first touch, and writing a slot whose old expert already sits on the GPU
first faults those pages back to the host: a miss is paid two or three times. This module makes a
miss cost its bytes: the reader fills pinned host *staging* memory, and the driver copies each
record's nine tensors to the slot (already device-resident) with one asynchronous DMA per
component (``cuMemcpyHtoDAsync``), then one stream sync. The host never touches a slot's pages.
The alternative measured in ``benchmarks/RESULTS.md`` (``prefetch``: ``preadv`` into the slot, then
``cuMemPrefetchAsync`` of the written ranges) keeps the fault-back on recycled slots.

Nothing here is imported on Metal or the CPU backend: ``detect()`` returns None there, and also
when ``libcuda`` cannot be loaded or the bank arrays are not managed memory (the generic path then
runs unchanged). ``FLASHMOE_CUDA_RESIDENCY=off|staged|prefetch`` overrides the choice.

Per MoE layer with misses: ``misses x 9`` copy calls (a few microseconds each, no Python per byte),
one ``cuStreamSynchronize``; zero page faults on the GPU.
"""

from __future__ import annotations

import ctypes
import os
import sys

import mlx.core as mx
import numpy as np

MODES = ("staged", "prefetch", "off")
_CU_POINTER_ATTRIBUTE_IS_MANAGED = 8
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_STREAM_NON_BLOCKING = 1


class CudaError(RuntimeError):
    """A CUDA driver call failed."""


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def address(view) -> int:
    """The address of a writable buffer (an MLX array's memoryview is its own memory)."""
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


class CudaDevice:
    """The CUDA driver, bound to MLX's device (primary context) and one private stream."""

    def __init__(self, lib: ctypes.CDLL, device: int = 0):
        self._cu = lib
        self._check("cuInit", lib.cuInit(0))
        dev = ctypes.c_int()
        self._check("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), device))
        self._ctx = ctypes.c_void_p()
        self._check(
            "cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), dev)
        )
        self.device = dev.value
        self.bind()
        self._stream = ctypes.c_void_p()
        self._check(
            "cuStreamCreate",
            lib.cuStreamCreate(ctypes.byref(self._stream), _CU_STREAM_NON_BLOCKING),
        )
        self._copy = lib.cuMemcpyHtoDAsync_v2
        self._copy.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self._prefetch = getattr(lib, "cuMemPrefetchAsync_v2", None)
        if self._prefetch is not None:
            self._prefetch.argtypes = [
                ctypes.c_uint64,
                ctypes.c_size_t,
                _MemLocation,
                ctypes.c_uint,
                ctypes.c_void_p,
            ]
        self._location = _MemLocation(_CU_MEM_LOCATION_TYPE_DEVICE, self.device)

    def _check(self, what: str, rc: int) -> None:
        if rc:
            msg = ctypes.c_char_p()
            self._cu.cuGetErrorString(rc, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else f"error {rc}"
            raise CudaError(f"CUDA {what} failed: {text}")

    @property
    def context(self) -> int:
        """The address of MLX's (primary) CUDA context."""
        return self._ctx.value

    def bind(self) -> None:
        """Make MLX's context current on the calling thread (driver calls need it)."""
        self._check("cuCtxSetCurrent", self._cu.cuCtxSetCurrent(self._ctx))

    def is_managed(self, ptr: int) -> bool:
        flag = ctypes.c_int(0)
        rc = self._cu.cuPointerGetAttribute(
            ctypes.byref(flag), _CU_POINTER_ATTRIBUTE_IS_MANAGED, ctypes.c_uint64(ptr)
        )
        return rc == 0 and bool(flag.value)

    def pinned(self, nbytes: int) -> memoryview:
        """Page-locked host memory of ``nbytes`` (page-aligned; freed with the process)."""
        ptr = ctypes.c_void_p()
        self._check("cuMemHostAlloc", self._cu.cuMemHostAlloc(ctypes.byref(ptr), nbytes, 0))
        return memoryview((ctypes.c_char * nbytes).from_address(ptr.value)).cast("B")

    def copy_to_device(self, copies: list[tuple[int, int, int]]) -> None:
        """Queue ``(device_address, host_address, nbytes)`` copies on the private stream."""
        stream = self._stream
        for dst, src, n in copies:
            rc = self._copy(dst, src, n, stream)
            if rc:
                self._check("cuMemcpyHtoDAsync", rc)

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Queue migrations of managed ``(address, nbytes)`` ranges to the device."""
        if self._prefetch is None:
            raise CudaError("CUDA cuMemPrefetchAsync_v2 is not available (driver older than 12.2)")
        for ptr, n in ranges:
            rc = self._prefetch(ptr, n, self._location, 0, self._stream)
            if rc:
                self._check("cuMemPrefetchAsync", rc)

    def synchronize(self) -> None:
        self._check("cuStreamSynchronize", self._cu.cuStreamSynchronize(self._stream))


def on_cuda() -> bool:
    """Whether MLX computes on a CUDA GPU here (its default device)."""
    cuda = getattr(mx, "cuda", None)
    try:
        return cuda is not None and cuda.is_available() and mx.default_device() == mx.gpu
    except Exception:
        return False


def shadowed_cuda_build() -> str | None:
    """A one-line fix when an MLX CUDA wheel is installed but its library was overwritten.

    ``mlx-cpu`` and ``mlx-cuda-*`` both install ``mlx/lib/libmlx.so``; with both present (the
    Linux default plus ``flashmoe[cuda]``) whichever pip unpacked last wins, silently.
    """
    from importlib import metadata

    for dist in ("mlx-cuda-13", "mlx-cuda-12"):
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if str(f).endswith("lib/libmlx.so") and f.size:
                try:
                    size = f.locate().stat().st_size
                except OSError:
                    continue
                if size != f.size:
                    return (
                        f"{dist} is installed but {f.locate()} is another MLX build's copy "
                        f"(mlx-cpu installs the same file); MLX runs on the CPU. Fix: "
                        f"pip install --force-reinstall --no-deps {dist}=={metadata.version(dist)}"
                    )
    return None


def detect(sample: mx.array | None = None) -> tuple[CudaDevice, str] | None:
    """The CUDA device and residency mode for bank arrays, or None (Metal, CPU, no driver).

    ``sample``: an evaluated bank array; the mode applies only if it is managed memory.
    """
    mode = os.environ.get("FLASHMOE_CUDA_RESIDENCY", "staged").strip().lower()
    if mode not in MODES:
        raise ValueError(f"FLASHMOE_CUDA_RESIDENCY={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    if not on_cuda():
        if sys.platform == "linux":
            fix = shadowed_cuda_build()
            if fix:
                print(f"flashmoe: {fix}", file=sys.stderr)
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        device = CudaDevice(lib)
    except (OSError, AttributeError, CudaError) as e:
        print(
            f"flashmoe: CUDA driver not usable ({e}); slots migrate on first touch", file=sys.stderr
        )
        return None
    if sample is not None and not device.is_managed(address(memoryview(sample).cast("B"))):
        return None
    return device, mode
