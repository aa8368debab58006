"""Page cache control for benchmark files: drop (POSIX_FADV_DONTNEED), warm, and measure (mincore)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import numpy as np

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value
PAGE = os.sysconf("SC_PAGE_SIZE")


def files_of(*paths: str | Path) -> list[Path]:
    """Every regular file under the given directories (or the files themselves), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink()))
    return out


def resident_bytes(path: str | Path) -> tuple[int, int]:
    """(bytes of ``path`` in the page cache, file size), from ``mincore`` over a shared mapping."""
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {path} failed: {os.strerror(err)}")
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore of {path} failed: {os.strerror(err)}")
            resident = sum(b & 1 for b in bytes(vec))
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return min(resident * PAGE, size), size


def residency(files: list[Path]) -> float:
    """Fraction of the bytes of ``files`` in the page cache."""
    got = total = 0
    for f in files:
        r, s = resident_bytes(f)
        got, total = got + r, total + s
    return got / total if total else 1.0


def drop(files: list[Path]) -> float:
    """Evict ``files`` from the page cache (fdatasync + POSIX_FADV_DONTNEED); return what stays."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return residency(files)


def warm(files: list[Path], block: int = 8 << 20) -> float:
    """Read ``files`` through the page cache; return the resident fraction afterwards."""
    buf = bytearray(block)
    view = memoryview(buf)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.readv(fd, [view]) > 0:
                pass
        finally:
            os.close(fd)
    return residency(files)


def resident_fraction(fd: int, offset: int = 0, length: int | None = None) -> float:
    """Fraction of the pages of ``[offset, offset + length)`` in the page cache (mmap + mincore)."""
    page = mmap.PAGESIZE
    if length is None:
        length = os.fstat(fd).st_size - offset
    start = offset // page * page
    span = offset + length - start
    addr = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        vec = (ctypes.c_ubyte * -(-span // page))()
        if _libc.mincore(addr, span, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    finally:
        _libc.munmap(addr, span)
    return float((np.frombuffer(vec, dtype=np.uint8) & 1).mean())
