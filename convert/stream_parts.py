"""A layer file written shard by shard: a streamed conversion's layers whose experts span shards.

Each stacked tensor lies in one shard, so a layer spanning shards A and B is the components in A
plus those in B. ``write_part`` puts one shard's components into every record of
``<layer>.partial`` as soon as that shard is here (A can then leave the cache before B arrives);
``finish_part`` adds the last shard's components, hashes every whole record (the earlier parts
read back from the file) and commits the file. Same bytes and checksums as ``write_layer``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import ExitStack
from pathlib import Path

from ..layouts import Component
from .errors import ConvertError
from .fileio import finish, open_for_write, preadv_full, pwrite_full
from .safetensors_source import TensorInfo
from .writers import Progress, _check, _open_sources, batch_experts, read_records


def runs(components: list[Component]) -> list[tuple[int, int]]:
    """The byte ranges ``(start, end)`` inside a record that ``components`` cover, merged."""
    out: list[tuple[int, int]] = []
    for c in sorted(components, key=lambda c: c.offset):
        if out and out[-1][1] == c.offset:
            out[-1] = (out[-1][0], c.offset + c.nbytes)
        else:
            out.append((c.offset, c.offset + c.nbytes))
    return out


def _write_runs(fd: int, buf: memoryview, spans, first: int, count: int, rec: int) -> None:
    for i in range(count):
        for a, b in spans:
            pwrite_full(fd, buf[i * rec + a : i * rec + b], (first + i) * rec + a)


def write_part(
    src_dir: Path,
    tensors: list[TensorInfo],
    components: list[Component],
    num_experts: int,
    rec: int,
    partial: Path,
    progress: Progress,
    stop: threading.Event | None = None,
) -> None:
    """Write ``components`` (from ``tensors``, all in one shard) into every record of
    ``partial``, created at its full size if missing; durable on return."""
    buf = memoryview(bytearray(batch_experts(rec, False) * rec))
    batch, spans = len(buf) // rec, runs(components)
    part_bytes = sum(c.nbytes for c in components)
    with ExitStack() as stack:
        fds = _open_sources(stack, src_dir, tensors)
        if partial.exists():
            fd = os.open(partial, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        else:
            fd = open_for_write(partial, num_experts * rec)
        stack.callback(os.close, fd)
        for first in range(0, num_experts, batch):
            _check(stop)
            count = min(batch, num_experts - first)
            read_records(fds, src_dir, tensors, components, rec, first, count, buf)
            _write_runs(fd, buf, spans, first, count, rec)
            progress(count * part_bytes)
        os.fsync(fd)  # before the part is recorded as done


def finish_part(
    src_dir: Path,
    tensors: list[TensorInfo],
    components: list[Component],
    all_components: list[Component],
    num_experts: int,
    rec: int,
    final: Path,
    progress: Progress,
    stop: threading.Event | None = None,
) -> list[str]:
    """Write the last shard's ``components`` into ``<final>.partial`` (whose other components
    are written), commit it as ``final``; the sha256 of every record's expert bytes."""
    partial = final.with_name(final.name + ".partial")
    expert_bytes = sum(c.nbytes for c in all_components)
    buf = memoryview(bytearray(batch_experts(rec, False) * rec))
    batch, spans = len(buf) // rec, runs(components)
    part_bytes = sum(c.nbytes for c in components)
    checksums: list[str] = []
    with ExitStack() as stack:
        fds = _open_sources(stack, src_dir, tensors)
        fd = os.open(partial, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            for first in range(0, num_experts, batch):
                _check(stop)
                count = min(batch, num_experts - first)
                preadv_full(fd, [buf[: count * rec]], first * rec, partial)
                read_records(fds, src_dir, tensors, components, rec, first, count, buf)
                for i in range(count):
                    checksums.append(
                        hashlib.sha256(buf[i * rec : i * rec + expert_bytes]).hexdigest()
                    )
                _write_runs(fd, buf, spans, first, count, rec)
                progress(count * part_bytes)
        except BaseException:
            os.close(fd)
            raise
        finish(fd, partial, final)  # closes fd
    return checksums


def compare_part(
    src_dir: Path,
    tensors: list[TensorInfo],
    components: list[Component],
    num_experts: int,
    rec: int,
    path: Path,
    layer: int,
    stop: threading.Event | None = None,
) -> None:
    """``--verify`` for one shard's components: re-read them from ``path`` (the layer file or
    its partial) and compare them with the source."""
    expected_buf = bytearray(batch_experts(rec, False) * rec)
    expected, actual = memoryview(expected_buf), bytearray(len(expected_buf))
    batch, spans = len(expected) // rec, runs(components)
    with ExitStack() as stack:
        fds = _open_sources(stack, src_dir, tensors)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, fd)
        for first in range(0, num_experts, batch):
            _check(stop)
            count = min(batch, num_experts - first)
            read_records(fds, src_dir, tensors, components, rec, first, count, expected)
            preadv_full(fd, [memoryview(actual)[: count * rec]], first * rec, path)
            for i in range(count):
                for a, b in spans:  # bytearray slices compare with memcmp
                    if expected_buf[i * rec + a : i * rec + b] != actual[i * rec + a : i * rec + b]:
                        raise ConvertError(
                            path,
                            f"layer {layer} expert {first + i}: written bytes differ from the source",
                        )
