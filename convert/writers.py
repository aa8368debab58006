"""Write one layout file each: a layer file of expert records, the dense file, a copied file.

Every writer writes ``<name>.partial``, fsyncs it and renames it, and returns the checksums it
computed from the very bytes it wrote (the staging buffer), so nothing is read twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from ..layouts import Component
from .errors import ConvertError
from .fileio import aligned_buffer, finish, open_for_write, preadv_full, pwrite_full
from .safetensors_source import TensorInfo

Progress = Callable[[int], None]
BATCH_BYTES = 16 * 1024 * 1024  # staging buffer per worker: bounds memory whatever the model size
CHUNK = 8 * 1024 * 1024
SLOW_ENV = "FLASHMOE_CONVERT_TEST_SLOW"  # tests: seconds to sleep per expert, to kill mid-layer


class Cancelled(Exception):
    """Another worker failed; stop early."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled


def component_sources(
    tensors: list[TensorInfo], components: list[Component], num_experts: int
) -> list[list[TensorInfo]]:
    """Split a layer's source tensors (``MoeLayer.tensors``) by component: one stacked
    ``[N, ...]`` tensor, or N per-expert tensors (told apart by rank)."""
    out, i = [], 0
    for c in components:
        if i < len(tensors) and len(tensors[i].shape) == len(c.shape) + 1:
            out.append(tensors[i : i + 1])
            i += 1
        else:
            out.append(tensors[i : i + num_experts])
            i += num_experts
    if i != len(tensors) or any(not ts for ts in out):
        raise ValueError(f"{len(tensors)} source tensors do not match {len(components)} components")
    return out


def _open_sources(
    stack: ExitStack, src_dir: Path, sources: list[list[TensorInfo]]
) -> list[dict[str, int]]:
    """Per component, a descriptor per shard file, so each sequential stream keeps its own
    kernel read-ahead."""
    fds = []
    for tensors in sources:
        by_file: dict[str, int] = {}
        for name in dict.fromkeys(t.file for t in tensors):
            fd = os.open(src_dir / name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            stack.callback(os.close, fd)
            if hasattr(os, "posix_fadvise"):
                start = min(t.start for t in tensors if t.file == name)
                end = max(t.end for t in tensors if t.file == name)
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_SEQUENTIAL)
            by_file[name] = fd
        fds.append(by_file)
    return fds


def batch_experts(record_size: int, slow: bool) -> int:
    return 1 if slow else max(1, BATCH_BYTES // record_size)


def read_records(
    fds: list[dict[str, int]],
    src_dir: Path,
    sources: list[list[TensorInfo]],
    components: list[Component],
    record_size: int,
    first: int,
    count: int,
    buf: memoryview,
) -> None:
    """Scatter experts ``first .. first+count`` from their source tensors into ``buf`` as records.

    Expert ``e``'s slice of a stacked tensor is contiguous and the slices of consecutive experts
    are adjacent, so one ``preadv`` per component fills that component in all ``count`` records;
    per-expert tensors are read in runs of adjacent ones.
    """
    for by_file, tensors, c in zip(fds, sources, components, strict=True):
        run: list[memoryview] = []
        run_file, run_start, run_end = "", 0, 0
        for i in range(count):
            e = first + i
            t = tensors[0] if len(tensors) == 1 else tensors[e]
            start = t.start + e * c.nbytes if len(tensors) == 1 else t.start
            if run and (t.file != run_file or start != run_end):
                preadv_full(by_file[run_file], run, run_start, src_dir / run_file)
                run = []
            if not run:
                run_file, run_start, run_end = t.file, start, start
            run.append(buf[i * record_size + c.offset : i * record_size + c.offset + c.nbytes])
            run_end += c.nbytes
        preadv_full(by_file[run_file], run, run_start, src_dir / run_file)


def write_layer(
    src_dir: Path,
    tensors: list[TensorInfo],
    components: list[Component],
    num_experts: int,
    record_size: int,
    final: Path,
    progress: Progress,
    stop: threading.Event | None = None,
) -> list[str]:
    """Write one layer file; return the sha256 of every record's first ``expert_bytes`` bytes."""
    expert_bytes = sum(c.nbytes for c in components)
    slow = float(os.environ.get(SLOW_ENV) or 0)
    batch = batch_experts(record_size, bool(slow))
    buf = aligned_buffer(batch * record_size)  # padding bytes stay zero: never written
    partial = final.with_name(final.name + ".partial")
    checksums: list[str] = []
    sources = component_sources(tensors, components, num_experts)
    with ExitStack() as stack:
        fds = _open_sources(stack, src_dir, sources)
        out = open_for_write(partial, num_experts * record_size, direct=True)
        try:
            for first in range(0, num_experts, batch):
                _check(stop)
                count = min(batch, num_experts - first)
                read_records(fds, src_dir, sources, components, record_size, first, count, buf)
                for i in range(count):
                    rec = buf[i * record_size : i * record_size + expert_bytes]
                    checksums.append(hashlib.sha256(rec).hexdigest())
                pwrite_full(out, buf[: count * record_size], first * record_size)
                progress(count * expert_bytes)
                if slow:
                    time.sleep(slow)
        except BaseException:
            os.close(out)
            raise
        finish(out, partial, final)
    return checksums


def dense_header(tensors: list[TensorInfo]) -> bytes:
    """The safetensors header of the dense file: sorted names, mlx metadata, 8-byte aligned."""
    header: dict = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in sorted(tensors, key=lambda t: t.name):
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def dense_size(tensors: list[TensorInfo]) -> int:
    return len(dense_header(tensors)) + sum(t.nbytes for t in tensors)


def write_dense(
    src_dir: Path,
    tensors: list[TensorInfo],
    final: Path,
    progress: Progress,
    stop: threading.Event | None = None,
) -> str:
    """Write the dense safetensors file; return its sha256."""
    tensors = sorted(tensors, key=lambda t: t.name)
    head = dense_header(tensors)
    size = len(head) + sum(t.nbytes for t in tensors)
    digest = hashlib.sha256(head)
    partial = final.with_name(final.name + ".partial")
    buf = memoryview(bytearray(CHUNK))
    fds: dict[str, int] = {}
    with ExitStack() as stack:
        for name in sorted({t.file for t in tensors}):
            fds[name] = os.open(src_dir / name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            stack.callback(os.close, fds[name])
        out = open_for_write(partial, size)
        try:
            pwrite_full(out, memoryview(head), 0)
            pos = len(head)
            for t in tensors:
                for start in range(t.start, t.end, CHUNK):
                    _check(stop)
                    n = min(CHUNK, t.end - start)
                    preadv_full(fds[t.file], [buf[:n]], start, src_dir / t.file)
                    digest.update(buf[:n])
                    pwrite_full(out, buf[:n], pos)
                    pos += n
                    progress(n)
        except BaseException:
            os.close(out)
            raise
        finish(out, partial, final)
    return digest.hexdigest()


def copy_file(src: Path, final: Path, progress: Progress) -> str:
    """Copy a small auxiliary file verbatim; return its sha256."""
    data = src.read_bytes()
    partial = final.with_name(final.name + ".partial")
    out = open_for_write(partial, len(data))
    try:
        pwrite_full(out, memoryview(data), 0)
    except BaseException:
        os.close(out)
        raise
    finish(out, partial, final)
    progress(len(data))
    return hashlib.sha256(data).hexdigest()


# --- verification against the source (--verify) ---


def _differ(a: bytearray, b: bytearray, n: int) -> bool:
    return a != b if n == len(a) else a[:n] != b[:n]


def compare_layer(
    src_dir: Path,
    tensors: list[TensorInfo],
    components: list[Component],
    num_experts: int,
    record_size: int,
    path: Path,
    layer: int,
    progress: Progress,
    stop: threading.Event | None = None,
) -> None:
    """Re-read every record of a written layer file and compare it with the source bytes."""
    batch = batch_experts(record_size, False)
    # bytearray comparison is a memcmp; memoryview comparison goes element by element.
    expected_buf, actual_buf = bytearray(batch * record_size), bytearray(batch * record_size)
    expected, actual = memoryview(expected_buf), memoryview(actual_buf)
    expert_bytes = sum(c.nbytes for c in components)
    sources = component_sources(tensors, components, num_experts)
    with ExitStack() as stack:
        fds = _open_sources(stack, src_dir, sources)
        out = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, out)
        for first in range(0, num_experts, batch):
            _check(stop)
            count = min(batch, num_experts - first)
            n = count * record_size
            read_records(fds, src_dir, sources, components, record_size, first, count, expected)
            preadv_full(out, [actual[:n]], first * record_size, path)
            if _differ(expected_buf, actual_buf, n):
                for i in range(count):
                    a, b = i * record_size, (i + 1) * record_size
                    if expected_buf[a:b] != actual_buf[a:b]:
                        raise ConvertError(
                            path,
                            f"layer {layer} expert {first + i}: written bytes differ from the source",
                        )
            progress(count * expert_bytes)


def compare_dense(src_dir: Path, tensors: list[TensorInfo], path: Path, progress: Progress) -> None:
    """Re-read the dense file and compare its header and every tensor with the source."""
    tensors = sorted(tensors, key=lambda t: t.name)
    head = dense_header(tensors)
    a_buf, b_buf = bytearray(CHUNK), bytearray(CHUNK)
    a, b = memoryview(a_buf), memoryview(b_buf)
    with ExitStack() as stack:
        out = os.open(path, os.O_RDONLY)
        stack.callback(os.close, out)
        if os.pread(out, len(head), 0) != head:
            raise ConvertError(path, "header differs from what the source implies")
        fds: dict[str, int] = {}
        pos = len(head)
        for t in tensors:
            if t.file not in fds:
                fds[t.file] = os.open(src_dir / t.file, os.O_RDONLY)
                stack.callback(os.close, fds[t.file])
            for start in range(t.start, t.end, CHUNK):
                n = min(CHUNK, t.end - start)
                preadv_full(fds[t.file], [a[:n]], start, src_dir / t.file)
                preadv_full(out, [b[:n]], pos, path)
                if _differ(a_buf, b_buf, n):
                    raise ConvertError(
                        path, f"tensor {t.name}: written bytes differ from the source"
                    )
                pos += n
                progress(n)
