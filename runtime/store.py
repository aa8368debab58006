"""ExpertStore: the layout's layer files, the reader and one expert bank per MoE layer.

Per layer and call the hot path is: one ``assign`` (dict work over at most ``slots`` experts), one
reader batch of ``misses * chunks`` scatter reads (``preadv``, straight into bank memory, zero
copies), and one wait. Syscalls per token = misses x split count; no other copies.

On MLX's CUDA backend (``metal/cuda.py``) the reads land in pinned staging memory instead and each
chunk is copied to its slot by DMA: per chunk, one ``cuMemcpyHtoDAsync`` per component tensor it
overlaps (9-10 per expert in all) and one stream sync, issued by the native worker that read it
(with the Python pool: all copies after the wait, one sync). Copies per token: the missed bytes
once, host -> device; the host never touches slot memory. Staging holds min(slots, 32) records;
larger unions (prefill) are read in rounds.
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
    """Counters since the last ``reset``.

    ``io_seconds`` is the *exposed* expert I/O: wall time the computation waited for reads (its
    own misses, and read-ahead still in flight). ``prefetch_seconds`` is the wall time from each
    read-ahead's submission to the end of its wait (an upper bound of its I/O time, mostly hidden).
    ``bytes_read`` includes read-ahead. A read-ahead expert is "used" when the layer it was read
    for routes to it at that step; precision = used / read ahead, recall = used / (used + misses).
    """

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_seconds: float = 0.0
    calls: int = 0
    per_layer_misses: dict[int, int] = field(default_factory=dict)
    prefetch_experts: int = 0
    prefetch_used: int = 0
    prefetch_bytes: int = 0
    prefetch_unused_bytes: int = 0
    prefetch_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def prefetch_precision(self) -> float:
        return self.prefetch_used / self.prefetch_experts if self.prefetch_experts else 0.0

    @property
    def prefetch_recall(self) -> float:
        wanted = self.prefetch_used + self.misses
        return self.prefetch_used / wanted if wanted else 0.0

    def reset(self) -> None:
        self.hits = self.misses = self.bytes_read = self.calls = 0
        self.prefetch_experts = self.prefetch_used = 0
        self.prefetch_bytes = self.prefetch_unused_bytes = 0
        self.io_seconds = self.prefetch_seconds = 0.0
        self.per_layer_misses.clear()


@dataclass
class _Area:
    """Pinned staging memory for ``records`` expert records; ``key`` tags its chunk cache."""

    view: memoryview
    records: int
    key: int


@dataclass
class _Ahead:
    """A read-ahead in flight for one layer: the batch, the (expert, slot) pairs it fills."""

    batch: object
    misses: list
    nbytes: int
    started: float


PREFETCH_MODES = ("off", "on", "auto")
# auto: read ahead only while recent precision stays above this (probing every 16th call when
# below), and only with a bank of at least 2 x top-k slots (room for guesses beside the hits).
_AUTO_MIN_PRECISION = 0.3


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
        prefetch: str = "off",
        policy: str = "lru",
    ):
        from ..layouts.plan import split_plan

        if prefetch not in PREFETCH_MODES:
            raise ValueError(
                f"prefetch must be one of {', '.join(PREFETCH_MODES)}, got {prefetch!r}"
            )
        self.prefetch_mode = prefetch
        from ..metal.policies import make_policy

        make_policy(policy)  # refuses an unknown name now, not at the first bank
        self.policy = policy
        self._ahead: dict[int, _Ahead] = {}
        self._ahead_area: _Area | None = None
        self._precision = 1.0  # moving average of read-ahead precision (auto mode)
        self._probe = 0

        self.root = Path(root)
        self.index = index
        self.reader = reader
        self.slots = slots
        self.split = split
        self.verify = verify
        self.direct = direct
        self.stats = StoreStats()
        self.trace = None  # a runtime.trace.TraceWriter when load(trace=...) asks for one
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
        self._staging: _Area | None = None
        self._copies_in_pool = False
        # layer -> (address of slot 0 of each component array, bytes per slot of each)
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
                policy=self._policy_factory,
                page_aligned=aligned,
            )
            self._fds[layer] = open_for_reading(self._paths[layer], direct=self.direct)
            if len(self.banks) == 1:
                self._setup_residency(bank)
            if self._cuda is not None:
                self._bank_arrays[layer] = (
                    np.array([cuda.address(v) for v in bank.slot_buffers(0)], dtype=np.uint64),
                    np.array(bank.slot_nbytes, dtype=np.uint64),
                )
        return bank

    def _policy_factory(self):
        from ..metal.policies import make_policy

        return make_policy(self.policy)

    def _setup_residency(self, bank: ExpertBank) -> None:
        found = cuda.detect(bank.arrays[0])
        if found is None:
            return
        self._cuda, self.residency = found
        if self.residency == "staged":
            # Enough pinned memory for a decode step's misses in one round; larger unions
            # (prefill) go in rounds of this many records.
            records = max(1, min(self.slots, 32))
            self._staging = _Area(self._cuda.pinned(records * self.index.record_size), records, -1)
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
            self._component_offsets = np.array(
                [c.offset for c in self.index.components], dtype=np.uint64
            )

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
        t0 = time.perf_counter()
        ahead = self._settle(layer)
        bank.fence()
        hits, misses = bank.assign(experts)
        self.stats.calls += 1
        self.stats.hits += len(hits)
        if ahead is not None and ahead.misses:
            used = len({e for e, _ in ahead.misses} & set(experts))
            self.stats.prefetch_used += used
            self.stats.prefetch_unused_bytes += (len(ahead.misses) - used) * (
                ahead.nbytes // len(ahead.misses)
            )
            self._precision = 0.8 * self._precision + 0.2 * used / len(ahead.misses)
        if misses:
            self.stats.misses += len(misses)
            self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + len(
                misses
            )
            area = self._staging
            step = area.records if area is not None else len(misses)
            for i in range(0, len(misses), step):
                part = misses[i : i + step]
                requests, nbytes = self._requests(layer, bank, part, area)
                batch = self.reader.submit(requests)
                self._complete(layer, bank, part, area, batch, nbytes, abort=misses)
        self.stats.io_seconds += time.perf_counter() - t0
        return bank

    def prefetch_wanted(self, top_k: int) -> bool:
        """Whether to read ahead now (``prefetch`` mode, bank size, recent precision)."""
        mode = self.prefetch_mode
        if mode != "auto":
            return mode == "on"
        if self.slots < 2 * top_k or self.slots >= self.index.num_experts:
            return False
        if self._precision >= _AUTO_MIN_PRECISION:
            return True
        self._probe += 1
        return self._probe % 16 == 0

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start reading the guessed ``experts`` of ``layer`` that are not resident; don't wait.

        Guesses take slots like misses (least recently used first, never a guessed expert);
        at most half the bank is guessed. ``ensure(layer, ...)`` waits for the reads before it
        touches the bank. Only residency changes: what is computed never does.
        """
        if layer in self._ahead or layer not in self._paths:
            return
        if self._staging is not None and self._ahead:
            # one staging area for read-ahead: an older one still in flight (a step cut short
            # by an error) must land before the area is reused
            self.settle_all()
        bank = self.bank(layer)
        bank.fence()
        guess = list(experts)[: max(1, self.slots // 2)]
        _, misses = bank.assign(guess)
        area = None
        if self._staging is not None and misses:
            if self._ahead_area is None:
                records = max(1, min(self.slots // 2, 32))
                view = self._cuda.pinned(records * self.index.record_size)
                self._ahead_area = _Area(view, records, -2)
            area = self._ahead_area
            if len(misses) > area.records:
                bank.abort(misses[area.records :])
                misses = misses[: area.records]
        if not misses:
            self._ahead[layer] = _Ahead(None, [], 0, time.perf_counter())
            return
        requests, nbytes = self._requests(layer, bank, misses, area)
        try:
            batch = self.reader.submit(requests)
        except BaseException:
            bank.abort(misses)
            raise
        self._ahead[layer] = _Ahead(batch, misses, nbytes, time.perf_counter())
        self.stats.prefetch_experts += len(misses)
        self.stats.prefetch_bytes += nbytes

    def _settle(self, layer: int) -> _Ahead | None:
        """Wait for ``layer``'s read-ahead (if any) and finish it (verify, device copies)."""
        ahead = self._ahead.pop(layer, None)
        if ahead is not None and ahead.batch is not None:
            area = self._ahead_area if self._staging is not None else None
            self._complete(
                layer, self.banks[layer], ahead.misses, area, ahead.batch, ahead.nbytes,
                abort=ahead.misses,
            )  # fmt: skip
            self.stats.prefetch_seconds += time.perf_counter() - ahead.started
        return ahead

    def settle_all(self) -> None:
        """Wait for every read-ahead in flight (before closing, or emptying the banks)."""
        for layer in list(self._ahead):
            self._settle(layer)

    def _requests(self, layer: int, bank: ExpertBank, part, area: _Area | None):
        """The read requests of ``part`` ((expert, slot) pairs), and their bytes.

        ``area`` None: straight into the slots. Otherwise into pinned staging, record ``i`` of
        ``part`` at record ``i`` of the area; with the native pool each request carries its
        chunk's (device, host, bytes) copy triples, run by the worker right after the read.
        """
        fd, path = self._fds[layer], self._paths[layer]
        record = self.index.record_size
        requests, nbytes = [], 0
        if area is None:
            for e, slot in part:
                for start, bufs, length in self._chunks(layer, bank, slot):
                    requests.append(ReadRequest(fd, e * record + start, bufs, path))
                    nbytes += length
        elif self._copies_in_pool:
            addrs, sizes = self._bank_arrays[layer]
            base = cuda.address(area.view)
            for i, (e, slot) in enumerate(part):
                dst_base = addrs + np.uint64(slot) * sizes - self._component_offsets
                src_base = np.uint64(base + i * record)
                for start, bufs, length, comp, lo, n in self._staged_chunks(area, i):
                    triples = np.empty((comp.size, 3), dtype=np.uint64)
                    triples[:, 0] = dst_base[comp] + lo
                    triples[:, 1] = src_base + lo
                    triples[:, 2] = n
                    requests.append((fd, e * record + start, bufs, path, triples.tobytes()))
                    nbytes += length
        else:
            for i, (e, _) in enumerate(part):
                for start, bufs, length, *_ in self._staged_chunks(area, i):
                    requests.append(ReadRequest(fd, e * record + start, bufs, path))
                    nbytes += length
        return requests, nbytes

    def _complete(self, layer, bank, part, area: _Area | None, batch, nbytes, *, abort) -> None:
        """Wait for ``batch`` (the reads of ``part``), verify, move to the device where needed.

        On any failure (Ctrl-C included) every read has ended and the slots of ``abort`` are
        free again before the error propagates: no slot that a read may not have filled looks
        valid.
        """
        try:
            batch.wait()
            record = self.index.record_size
            if self.verify:
                if area is None:
                    records = [(e, bank.slot_buffers(slot)) for e, slot in part]
                else:
                    size = self.index.expert_bytes
                    records = [
                        (e, (area.view[i * record : i * record + size],))
                        for i, (e, _) in enumerate(part)
                    ]
                self._check(layer, records)
            if area is not None and not self._copies_in_pool:
                base = cuda.address(area.view)
                copies = []
                for i, (_, slot) in enumerate(part):
                    src = base + i * record
                    for a, n in self._ranges(layer, bank):
                        copies.append((a + slot * n, src, n))
                        src += n
                self._cuda.bind()
                self._cuda.copy_to_device(copies)
                self._cuda.synchronize()
            elif area is None and self._cuda is not None:
                # "prefetch" residency: migrate the written ranges in bulk
                self._cuda.bind()
                self._cuda.prefetch(
                    [(a + slot * n, n) for _, slot in part for a, n in self._ranges(layer, bank)]
                )
                self._cuda.synchronize()
        except BaseException:
            _drain(batch)  # no read may still land in a slot we hand back
            bank.abort(abort)
            raise
        self.stats.bytes_read += nbytes

    def _ranges(self, layer: int, bank: ExpertBank) -> list[tuple[int, int]]:
        """(address of slot 0, bytes per slot) of each component array of ``layer``'s bank."""
        addrs, sizes = self._bank_arrays[layer]
        return list(zip(addrs.tolist(), sizes.tolist(), strict=True))

    def _staged_chunks(self, area: _Area, i: int):
        """Per chunk of staging record ``i``: (start, views, length, components, lo, nbytes).

        ``components``/``lo``/``nbytes`` (numpy) are the pieces of the component tensors the
        chunk holds, in record coordinates: what its device copies are made of.
        """
        key = (area.key, i)
        chunks = self._chunk_cache.get(key)
        if chunks is None:
            record, expert = self.index.record_size, self.index.expert_bytes
            size = record if self.direct else expert
            view = area.view[i * record : i * record + size]
            chunks = []
            for start, bufs in split_buffers((view,), self.plan):
                length = sum(b.nbytes for b in bufs)
                end = min(start + length, expert)  # record padding is never copied
                pieces = [
                    (k, max(start, c.offset), min(end, c.offset + c.nbytes))
                    for k, c in enumerate(self.index.components)
                    if max(start, c.offset) < min(end, c.offset + c.nbytes)
                ]
                comp = np.array([p[0] for p in pieces], dtype=np.int64)
                lo = np.array([p[1] for p in pieces], dtype=np.uint64)
                n = np.array([p[2] - p[1] for p in pieces], dtype=np.uint64)
                chunks.append((start, bufs, length, comp, lo, n))
            self._chunk_cache[key] = chunks
        return chunks

    def clear_banks(self) -> None:
        """Empty every bank (as right after loading); the next calls read all their experts."""
        self.settle_all()
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
        try:
            self.settle_all()
        finally:
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
