"""Check a layout against its index (FORMAT.md, "Verification"): sizes, the checksum of every
record and file, zero padding. Shared by the converter (verify, publish, reruns) and the runtime
(pull, ``load(verify=True)``)."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .fileio import ShortRead, preadv_full
from .layouts import Index, LayerFile, LayoutError, read_index, safe_relative_path

_CHUNK = 8 * 1024 * 1024


def _read_exact(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    try:
        preadv_full(fd, [buf], offset)
    except ShortRead:
        raise LayoutError(f"{path}: shorter than the index says") from None


def _check_size(path: Path, size: int, what: str) -> None:
    try:
        actual = os.path.getsize(path)
    except FileNotFoundError:
        raise LayoutError(f"{path}: missing ({what})") from None
    if actual != size:
        raise LayoutError(f"{path}: {actual} bytes, the index says {size} ({what})")


def _check_layer(root: Path, index: Index, entry: LayerFile, checksums: bool, tick) -> None:
    path = safe_relative_path(root, entry.file, "layer file")
    _check_size(path, entry.size, f"layer {entry.layer}")
    if not checksums:
        return
    rec, used = index.record_size, index.expert_bytes
    batch = max(1, _CHUNK // rec)
    buf = memoryview(bytearray(batch * rec))
    zeros = bytes(rec - used)
    fd = os.open(path, os.O_RDONLY)
    try:
        for first in range(0, index.num_experts, batch):
            count = min(batch, index.num_experts - first)
            _read_exact(fd, buf[: count * rec], first * rec, path)
            for i in range(count):
                e = first + i
                record = buf[i * rec : (i + 1) * rec]
                digest = hashlib.sha256(record[:used]).hexdigest()
                if digest != entry.checksums[e]:
                    raise LayoutError(
                        f"{path}: layer {entry.layer} expert {e}: sha256 mismatch "
                        f"(index {entry.checksums[e][:12]}..., file {digest[:12]}...)"
                    )
                if zeros and bytes(record[used:]) != zeros:
                    raise LayoutError(
                        f"{path}: layer {entry.layer} expert {e}: padding is not zero"
                    )
            tick(count * rec)
    finally:
        os.close(fd)


def _check_file(
    root: Path, name: str, size: int, sha256: str | None, checksums: bool, tick
) -> None:
    path = safe_relative_path(root, name)
    _check_size(path, size, "file")
    if not checksums or sha256 is None:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            tick(len(chunk))
    if digest.hexdigest() != sha256:
        raise LayoutError(
            f"{path}: sha256 mismatch (index {sha256[:12]}..., file {digest.hexdigest()[:12]}...)"
        )


def verify_layout(
    root: str | os.PathLike,
    *,
    checksums: bool = True,
    progress: bool = False,
    workers: int = 2,
    layers: Collection[int] | None = None,
) -> Index:
    """Check the layout at ``root``; return its index, or raise LayoutError naming the bad file.

    Sizes always; with ``checksums``, the sha256 of every expert record (and that its padding is
    zero), of the dense file and of every copied file. ``layers``: check only those MoE layers'
    files (with the dense and copied files), e.g. the part one pipeline rank reads.
    """
    root = Path(root)
    index = read_index(root)
    entries = [e for e in index.layers if layers is None or e.layer in layers]
    total = sum(e.size for e in entries) + index.dense.size + sum(f.size for f in index.files)
    bar = None
    if progress and checksums:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify")
    lock = threading.Lock()

    def tick(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    try:
        jobs = [(_check_file, (root, index.dense.name, index.dense.size, index.dense.sha256))]
        jobs += [(_check_file, (root, f.name, f.size, f.sha256)) for f in index.files]
        layer_jobs = [(_check_layer, (root, index, entry)) for entry in entries]
        # Layers first and in order, so that the first error reported is the lowest bad layer.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = [pool.submit(fn, *args, checksums, tick) for fn, args in layer_jobs + jobs]
            try:
                for fut in futures:
                    fut.result()
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        if bar is not None:
            bar.close()
    return index


def spot_check_layout(root: str | os.PathLike, index: Index) -> str:
    """A cheap integrity check of a finished layout; returns what it checked (one phrase).

    Sizes of every file, sha256 of every copied file (config, tokenizer, chat template: small),
    and of the first, middle and last expert record of every layer file (with their zero
    padding). Raises LayoutError naming the bad file. ``verify_layout`` checks everything.
    """
    root = Path(root)
    verify_layout(root, checksums=False)
    check_copied_files(root, index)
    rec, used = index.record_size, index.expert_bytes
    picks = sorted({0, index.num_experts // 2, index.num_experts - 1})
    buf = memoryview(bytearray(rec))
    zeros = bytes(rec - used)
    for entry in index.layers:
        path = safe_relative_path(root, entry.file, "layer file")
        fd = os.open(path, os.O_RDONLY)
        try:
            for e in picks:
                _read_exact(fd, buf, e * rec, path)
                digest = hashlib.sha256(buf[:used]).hexdigest()
                if digest != entry.checksums[e] or bytes(buf[used:]) != zeros:
                    raise LayoutError(f"{path}: layer {entry.layer} expert {e}: sha256 mismatch")
        finally:
            os.close(fd)
    return "sizes, copied files' sha256 and 3 expert records per layer checked"


def check_copied_files(root: str | os.PathLike, index: Index, dense: bool = False) -> None:
    """Size and sha256 of every copied file (and, with ``dense``, of the dense file)."""
    entries = [*index.files, *([index.dense] if dense else [])]
    for f in entries:
        _check_file(Path(root), f.name, f.size, f.sha256, True, lambda n: None)
