"""A layer file written shard by shard: a streamed conversion's layers whose experts span shards.

A layer spanning shards A and B is the expert slices in A plus those in B (whole stacked tensors,
or per-expert tensors). ``write_part`` puts one shard's slices into their records of
``<layer>.partial`` as soon as that shard is here (A can then leave the cache before B arrives);
``finish_part`` adds the last shard's slices, hashes every whole record (the earlier parts read
back from the file) and writes the whole records back (direct I/O, as ``write_layer``), then
commits the file. Same bytes and checksums as ``write_layer``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import NamedTuple

from ..layouts import Component
from .errors import ConvertError
from .fileio import aligned_buffer, finish, open_direct, open_for_write, preadv_full, pwrite_full
from .safetensors_source import TensorInfo
from .writers import Progress, _check, batch_experts, component_sources


class Slice(NamedTuple):
    expert: int
    offset: int  # in the record
    nbytes: int
    start: int  # in the shard


def shard_slices(
    tensors: list[TensorInfo], components: list[Component], num_experts: int, shard: str
) -> list[Slice]:
    """The expert slices of a layer's source ``tensors`` that lie in ``shard``, by expert."""
    out = []
    for c, ts in zip(components, component_sources(tensors, components, num_experts), strict=True):
        for e in range(num_experts):
            t = ts[0] if len(ts) == 1 else ts[e]
            if t.file == shard:
                start = t.start + e * c.nbytes if len(ts) == 1 else t.start
                out.append(Slice(e, c.offset, c.nbytes, start))
    return sorted(out)


def _batches(slices: list[Slice], num_experts: int, batch: int):
    """``(first, count, slices of experts first .. first+count)`` for every batch."""
    i = 0
    for first in range(0, num_experts, batch):
        count = min(batch, num_experts - first)
        j = i
        while j < len(slices) and slices[j].expert < first + count:
            j += 1
        yield first, count, slices[i:j]
        i = j


def _read(fd: int, buf: memoryview, slices: list[Slice], first: int, rec: int, path) -> None:
    for s in slices:
        at = (s.expert - first) * rec + s.offset
        preadv_full(fd, [buf[at : at + s.nbytes]], s.start, path)


def _write(fd: int, buf: memoryview, slices: list[Slice], first: int, rec: int) -> None:
    for s in slices:
        at = (s.expert - first) * rec + s.offset
        pwrite_full(fd, buf[at : at + s.nbytes], s.expert * rec + s.offset)


def write_part(
    src: Path,
    slices: list[Slice],
    num_experts: int,
    rec: int,
    partial: Path,
    progress: Progress,
    stop: threading.Event | None = None,
) -> None:
    """Write ``slices`` (all from the shard ``src``) into their records of ``partial``, created
    at its full size if missing; durable on return.

    The part that creates the file writes whole records (direct I/O, as ``write_layer``): where
    the other shards' slices go, they hold what the staging buffer held, which those shards'
    parts overwrite (padding is never staged: it stays zero). Later parts write their slices.
    """
    buf = aligned_buffer(batch_experts(rec, False) * rec)
    with ExitStack() as stack:
        fd_in = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, fd_in)
        whole = not partial.exists()
        if whole:
            fd = open_for_write(partial, num_experts * rec, direct=True)
        else:
            fd = os.open(partial, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, fd)
        for first, count, part in _batches(slices, num_experts, len(buf) // rec):
            _check(stop)
            _read(fd_in, buf, part, first, rec, src)
            if whole:
                pwrite_full(fd, buf[: count * rec], first * rec)
            else:
                _write(fd, buf, part, first, rec)
            progress(sum(s.nbytes for s in part))
        os.fsync(fd)  # before the part is recorded as done


def finish_part(
    src: Path,
    slices: list[Slice],
    expert_bytes: int,
    num_experts: int,
    rec: int,
    final: Path,
    progress: Progress,
    stop: threading.Event | None = None,
) -> list[str]:
    """Write the last shard's ``slices`` into ``<final>.partial`` (whose other slices are
    written) and commit it as ``final``; the sha256 of every record's expert bytes."""
    partial = final.with_name(final.name + ".partial")
    buf = aligned_buffer(batch_experts(rec, False) * rec)
    checksums: list[str] = []
    with ExitStack() as stack:
        fd_in = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, fd_in)
        fd = open_direct(partial, os.O_RDWR)
        try:
            for first, count, part in _batches(slices, num_experts, len(buf) // rec):
                _check(stop)
                preadv_full(fd, [buf[: count * rec]], first * rec, partial)
                _read(fd_in, buf, part, first, rec, src)
                for i in range(count):
                    checksums.append(
                        hashlib.sha256(buf[i * rec : i * rec + expert_bytes]).hexdigest()
                    )
                pwrite_full(fd, buf[: count * rec], first * rec)  # whole records: aligned
                progress(sum(s.nbytes for s in part))
        except BaseException:
            os.close(fd)
            raise
        finish(fd, partial, final)  # closes fd
    return checksums


def compare_part(
    src: Path,
    slices: list[Slice],
    rec: int,
    path: Path,
    layer: int,
    stop: threading.Event | None = None,
) -> None:
    """``--verify`` for one shard's slices: re-read them from ``path`` (the layer file or its
    partial) and compare them with the shard ``src``."""
    with ExitStack() as stack:
        fd_in = os.open(src, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, fd_in)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        stack.callback(os.close, fd)
        for s in slices:
            _check(stop)
            expected, actual = bytearray(s.nbytes), bytearray(s.nbytes)
            preadv_full(fd_in, [memoryview(expected)], s.start, src)
            preadv_full(fd, [memoryview(actual)], s.expert * rec + s.offset, path)
            if expected != actual:
                raise ConvertError(
                    path, f"layer {layer} expert {s.expert}: written bytes differ from the source"
                )
