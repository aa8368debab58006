"""ExpertStore: the layout's layer files, the reader and one expert bank per MoE layer.

Per layer and call the hot path is: one ``assign`` (dict work over at most ``slots`` experts), one
reader batch of ``misses * chunks`` scatter reads (``preadv``, straight into bank memory, zero
copies), and one wait. Syscalls per token = misses x split count; no other copies.
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..layouts import Index, safe_relative_path
from ..metal import cuda
from ..metal.bank import ExpertBank
from .reader import DIRECT_ALIGNMENT, ReadRequest, open_for_reading, split_buffers


@dataclass
class StoreStats:
    """Counters since the last ``reset``; I/O seconds are wall time spent waiting for reads."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_seconds: float = 0.0
    calls: int = 0
    per_layer_misses: dict[int, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def reset(self) -> None:
        self.hits = self.misses = self.bytes_read = self.calls = 0
        self.io_seconds = 0.0
        self.per_layer_misses.clear()


class ExpertStore:
    """Streams experts of a layout into per-layer banks of ``slots`` experts."""

    def __init__(
        self,
        root: str | os.PathLike,
        index: Index,
        reader,
        *,
        slots: int,
        split: int = 1,
        verify: bool = False,
        direct: bool = False,
    ):
        from ..layouts.plan import split_plan

        self.root = Path(root)
        self.index = index
        self.reader = reader
        self.slots = slots
        self.split = split
        self.verify = verify
        self.direct = direct
        self.stats = StoreStats()
        self.plan = split_plan(index.expert_bytes, index.alignment, split)
        self.components = [(c.name, c.dtype, c.shape) for c in index.components]
        # O_DIRECT needs every destination page-aligned in address and length: the bank arrays are
        # allocated aligned, and the record's padding (if any) goes to an aligned scratch buffer.
        self._pad: tuple[memoryview, ...] = ()
        if direct and sys.platform != "darwin":
            bad = [c.name for c in index.components if c.nbytes % DIRECT_ALIGNMENT]
            if bad:
                raise ValueError(
                    f"{self.root}: direct I/O needs every expert tensor to be a multiple of "
                    f"{DIRECT_ALIGNMENT} bytes ({', '.join(bad)} are not)"
                )
            pad = index.record_size - index.expert_bytes
            if pad:
                scratch = ExpertBank._allocate((pad,), mx.uint8, DIRECT_ALIGNMENT)
                mx.eval(scratch)
                self._pad = (memoryview(scratch).cast("B"),)
        self._fds: dict[int, int] = {}
        # The store owns the reader and the layer fds: released by close() or when collected.
        self._finalizer = weakref.finalize(self, _release, self._fds, reader)
        self._paths: dict[int, str] = {}
        self.banks: dict[int, ExpertBank] = {}
        # (layer, slot) -> per-chunk scatter buffers; built once, reused for every read.
        self._chunk_cache: dict[tuple[int, int], list[tuple[int, tuple[memoryview, ...]]]] = {}
        # CUDA (managed memory): reads land in pinned staging and are DMA'd to the slots
        # (metal/cuda.py says why); decided when the first bank exists. None elsewhere.
        self._cuda: cuda.CudaDevice | None = None
        self.residency = "host"
        self._staging: memoryview | None = None
        self._staging_records = 0
        self._bank_addresses: dict[int, list[int]] = {}
        self._copies_in_pool = False
        self._bank_arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._component_offsets: np.ndarray | None = None
        for entry in index.layers:
            path = safe_relative_path(self.root, entry.file, "layer file")
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: layer file missing") from None
            if size != entry.size:
                raise ValueError(f"{path}: size {size} bytes, index says {entry.size} (truncated?)")
            self._paths[entry.layer] = str(path)

    def bank(self, layer: int) -> ExpertBank:
        """The bank of ``layer``, allocated on first use."""
        bank = self.banks.get(layer)
        if bank is None:
            aligned = DIRECT_ALIGNMENT if self.direct else 0
            bank = self.banks[layer] = ExpertBank(
                self.slots,
                self.components,
                num_experts=self.index.num_experts,
                page_aligned=aligned,
            )
            self._fds[layer] = open_for_reading(self._paths[layer], direct=self.direct)
            if len(self.banks) == 1:
                self._setup_residency(bank)
            if self._cuda is not None:
                self._bank_addresses[layer] = [cuda.address(v) for v in bank.slot_buffers(0)]
                self._bank_arrays[layer] = (
                    np.array(self._bank_addresses[layer], dtype=np.uint64),
                    np.array(bank.slot_nbytes, dtype=np.uint64),
                )
        return bank

    def _setup_residency(self, bank: ExpertBank) -> None:
        found = cuda.detect(bank.arrays[0])
        if found is None:
            return
        self._cuda, self.residency = found
        if self.residency == "staged":
            # Enough pinned memory for a decode step's misses in one round; larger unions
            # (prefill) go in rounds of this many records.
            self._staging_records = max(1, min(self.slots, 32))
            self._staging = self._cuda.pinned(self._staging_records * self.index.record_size)
            # The native pool copies each chunk to the device right after reading it (the DMA
            # of one chunk overlaps the reads of the others); other readers copy after the wait.
            set_device = getattr(self.reader, "set_device", None)
            if set_device is not None:
                try:
                    set_device(self._cuda.context)
                    self._copies_in_pool = True
                except OSError:  # the pool could not load libcuda: copy after each wait
                    pass
            # Record coordinates of the components, for the per-chunk copy triples.
            sizes = np.array([c.nbytes for c in self.index.components], dtype=np.uint64)
            self._component_offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.uint64)

    def _chunks(self, layer: int, bank: ExpertBank, slot: int):
        key = (layer, slot)
        chunks = self._chunk_cache.get(key)
        if chunks is None:
            buffers = bank.slot_buffers(slot) + self._pad
            chunks = self._chunk_cache[key] = [
                (start, bufs, sum(b.nbytes for b in bufs))
                for start, bufs in split_buffers(buffers, self.plan)
            ]
        return chunks

    def ensure(self, layer: int, experts: list[int]) -> ExpertBank:
        """Make ``experts`` (distinct ids) resident in ``layer``'s bank, reading the misses."""
        bank = self.bank(layer)
        bank.fence()
        hits, misses = bank.assign(experts)
        self.stats.calls += 1
        self.stats.hits += len(hits)
        if misses:
            self.stats.misses += len(misses)
            self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + len(
                misses
            )
            t0 = time.perf_counter()
            if self._staging is not None:
                step = self._staging_records
                for i in range(0, len(misses), step):
                    self._read_staged(layer, bank, misses[i : i + step], misses)
            else:
                self._read(layer, bank, misses)
            self.stats.io_seconds += time.perf_counter() - t0
        return bank

    def _read(self, layer: int, bank: ExpertBank, misses: list[tuple[int, int]]) -> None:
        """Read ``misses`` straight into their slots (then, on CUDA, prefetch them)."""
        fd, path = self._fds[layer], self._paths[layer]
        record = self.index.record_size
        requests, nbytes = [], 0
        for e, slot in misses:
            for start, bufs, length in self._chunks(layer, bank, slot):
                requests.append(ReadRequest(fd, e * record + start, bufs, path))
                nbytes += length
        batch = self.reader.submit(requests)
        try:
            batch.wait()
            if self.verify:
                self._check(layer, [(e, bank.slot_buffers(slot)) for e, slot in misses])
            if self._cuda is not None:  # "prefetch": migrate the written ranges in bulk
                self._cuda.bind()
                self._cuda.prefetch(
                    [(a + slot * n, n) for e, slot in misses for a, n in self._ranges(layer, bank)]
                )
                self._cuda.synchronize()
        except BaseException:
            _drain(batch)  # no read may still land in a slot we hand back
            bank.abort(misses)
            raise
        self.stats.bytes_read += nbytes

    def _ranges(self, layer: int, bank: ExpertBank) -> list[tuple[int, int]]:
        return list(zip(self._bank_addresses[layer], bank.slot_nbytes, strict=True))

    def _read_staged(
        self, layer: int, bank: ExpertBank, part: list[tuple[int, int]], misses
    ) -> None:
        """Read ``part`` into pinned staging and DMA each record's tensors to its slot.

        With the native pool each read request carries its chunk's copies (run by the worker
        that read it); otherwise all copies are queued after the wait. Either way every copy
        has finished when this returns (staging is reused by the next round or call).
        """
        fd, path = self._fds[layer], self._paths[layer]
        record = self.index.record_size
        base = cuda.address(self._staging)
        requests, nbytes = [], 0
        if self._copies_in_pool:
            addrs, sizes = self._bank_arrays[layer]
            for i, (e, slot) in enumerate(part):
                dst_base = addrs + np.uint64(slot) * sizes - self._component_offsets
                src_base = np.uint64(base + i * record)
                for start, bufs, length, comp, lo, n in self._staged_chunks(i):
                    triples = np.empty((comp.size, 3), dtype=np.uint64)
                    triples[:, 0] = dst_base[comp] + lo
                    triples[:, 1] = src_base + lo
                    triples[:, 2] = n
                    requests.append((fd, e * record + start, bufs, path, triples.tobytes()))
                    nbytes += length
        else:
            for i, (e, _) in enumerate(part):
                for start, bufs, length, *_ in self._staged_chunks(i):
                    requests.append(ReadRequest(fd, e * record + start, bufs, path))
                    nbytes += length
        batch = self.reader.submit(requests)
        try:
            batch.wait()
            if self.verify:
                staging, size = self._staging, self.index.expert_bytes
                self._check(
                    layer,
                    [
                        (e, (staging[i * record : i * record + size],))
                        for i, (e, _) in enumerate(part)
                    ],
                )
            if not self._copies_in_pool:
                copies = []
                for i, (_, slot) in enumerate(part):
                    src = base + i * record
                    for a, n in self._ranges(layer, bank):
                        copies.append((a + slot * n, src, n))
                        src += n
                self._cuda.bind()
                self._cuda.copy_to_device(copies)
                self._cuda.synchronize()
        except BaseException:
            _drain(batch)
            bank.abort(misses)
            raise
        self.stats.bytes_read += nbytes

    def _staged_chunks(self, i: int):
        """Per chunk of staging record ``i``: (start, views, length, components, lo, nbytes).

        ``components``/``lo``/``nbytes`` (numpy) are the pieces of the component tensors the
        chunk holds, in record coordinates: what its device copies are made of.
        """
        key = (-1, i)
        chunks = self._chunk_cache.get(key)
        if chunks is None:
            record, expert = self.index.record_size, self.index.expert_bytes
            size = record if self.direct else expert
            view = self._staging[i * record : i * record + size]
            offsets = [int(o) for o in self._component_offsets]
            ends = [o + c.nbytes for o, c in zip(offsets, self.index.components, strict=True)]
            chunks = []
            for start, bufs in split_buffers((view,), self.plan):
                length = sum(b.nbytes for b in bufs)
                end = min(start + length, expert)  # record padding is never copied
                pieces = [
                    (c, max(start, o), min(end, e))
                    for c, (o, e) in enumerate(zip(offsets, ends, strict=True))
                    if max(start, o) < min(end, e)
                ]
                comp = np.array([p[0] for p in pieces], dtype=np.int64)
                lo = np.array([p[1] for p in pieces], dtype=np.uint64)
                n = np.array([p[2] - p[1] for p in pieces], dtype=np.uint64)
                chunks.append((start, bufs, length, comp, lo, n))
            self._chunk_cache[key] = chunks
        return chunks

    def clear_banks(self) -> None:
        """Empty every bank (as right after loading); the next calls read all their experts."""
        for bank in self.banks.values():
            bank.fence()
            bank.clear()

    def _check(self, layer: int, records) -> None:
        """Compare ``(expert, buffers)`` read for ``layer`` with the index's sha256."""
        import hashlib

        sums = self.index.layer(layer).checksums
        for e, buffers in records:
            h = hashlib.sha256()
            for b in buffers:
                h.update(b)
            if h.hexdigest() != sums[e]:
                raise ValueError(
                    f"{self._paths[layer]}: checksum mismatch for expert {e} of layer {layer}"
                )

    def close(self) -> None:
        """Close the layer files and stop the reader (idempotent)."""
        self._finalizer()


def _release(fds: dict[int, int], reader) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()
    reader.close()


def _drain(batch) -> None:
    """Wait until every read of ``batch`` has finished, whatever it raises (Ctrl-C included)."""
    while True:
        try:
            batch.wait()
            return
        except KeyboardInterrupt:
            continue
        except Exception:
            return
