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
from collections.abc import Iterable
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
    ``sync_seconds`` is the wall time the streaming layers waited on their router sync (the GPU
    finishing everything queued before it); ``host_seconds`` their own time after it, exposed I/O
    excluded (bookkeeping and building the expert graph). ``bytes_read`` includes read-ahead. A
    read-ahead expert is "used" when the layer it was read for routes to it at that step;
    precision = used / read ahead, recall = used / (used + misses).
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
    sync_seconds: float = 0.0
    host_seconds: float = 0.0

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
        self.sync_seconds = self.host_seconds = 0.0
        self.per_layer_misses.clear()


@dataclass
class _Area:
    """Pinned staging memory for ``records`` expert records; ``key`` tags its chunk cache."""

    view: memoryview
    records: int
    key: int


@dataclass
class _Ahead:
    """A read-ahead in flight for one layer: the batch, the (expert, slot) pairs it fills, the
    staging area it reads into (None: straight into the slots), which pairs have landed."""

    batch: object
    misses: list
    nbytes: int
    started: float
    area: _Area | None = None
    landed: set = field(default_factory=set)
    counted: bool = False

    @property
    def record_bytes(self) -> int:
        return self.nbytes // len(self.misses)


class Pending:
    """One ``ExpertStore.request``: ``hits`` are usable now, ``misses`` ((expert, slot) pairs)
    once ``wait()`` returned. A failed or interrupted wait frees the missed slots first."""

    def __init__(self, store: ExpertStore, layer: int, bank: ExpertBank, hits, misses):
        self.store, self.layer, self.bank = store, layer, bank
        self.hits: list[int] = hits
        self.misses: list[tuple[int, int]] = misses
        self.batch = None  # the reads in flight (the last staging round)
        self.part: list[tuple[int, int]] = []
        self.nbytes = 0

    def slot_ids(self, experts: np.ndarray) -> mx.array:
        """Slot ids of ``experts`` (any shape; hits at once, misses after ``wait``)."""
        return self.bank.slot_ids(experts)

    def computed(self, out: mx.array) -> None:
        """Register ``out``, computed over the bank: no slot is written again before it has
        been evaluated (the bank's ordering rule, enforced by ``request``'s fence)."""
        self.bank.add_pending(out)

    def land(self) -> None:
        """Wait for the reads in flight and finish them (verify, device copies)."""
        batch, self.batch = self.batch, None
        if batch is None:
            return
        store = self.store
        if store._open is self:
            store._open = None
        try:
            batch.wait()
            area = store._staging
            store._finish(
                self.layer, self.bank, [(i, e, s) for i, (e, s) in enumerate(self.part)], area
            )
        except BaseException:
            _drain(batch)  # no read may still land in a slot we hand back
            self.bank.abort(self.misses)
            raise
        store.stats.bytes_read += self.nbytes

    def wait(self) -> None:
        """Return once every missed expert is in its slot (exposed time counts as I/O)."""
        if self.batch is None:
            return
        t0 = time.perf_counter()
        try:
            self.land()
        finally:
            self.store.stats.io_seconds += time.perf_counter() - t0


PREFETCH_MODES = ("off", "on", "auto")


def overlap_measured() -> bool:
    """Whether MLX computes on a backend where read-ahead and experts launched before the router
    sync were measured to win at partial banks: CUDA (H200: 1.35-1.40 x the serial runtime at a
    25 % bank) and the CPU (this project's machines, 397B routing geometry: pair medians 1.05 and
    1.14 x the serial settings at a 25 % bank, 1.15 x at 50 %, break-even at the minimum bank;
    read-ahead alone broke even on a model bound by its matmuls; ``benchmarks/RESULTS.md``).
    Not Metal, where neither is measured."""
    return cuda.on_cuda() or mx.default_device() == mx.cpu


def default_prefetch() -> str:
    """The read-ahead mode used when none is asked for: ``auto`` where ``overlap_measured``,
    ``off`` elsewhere (Metal)."""
    return "auto" if overlap_measured() else "off"


def default_io_threads() -> int:
    """Read-pool threads used when none are asked for: 16 on CUDA (H200 host, 16 cores: 4-5 %
    more tok/s and 1.4 instead of 2.2 ms of exposed I/O per token than 8 at a 25 % bank,
    ``benchmarks/RESULTS.md``), 8 elsewhere (flash-moe's pool size on Apple silicon)."""
    return 16 if cuda.on_cuda() else 8


# auto: read ahead only while recent precision stays above this (probing every 16th call when
# below), and only with a bank of at least 2 x top-k slots (room for guesses beside the hits).
_AUTO_MIN_PRECISION = 0.3
# With presync, a layer whose guesses are still landing waits for them before launching its
# experts while recent precision is at least this (most steps then route to one of them).
_WAIT_PRECISION = 0.5


class ExpertStore:
    """Streams experts of a layout into per-layer banks of ``slots`` experts.

    ``layers``: the MoE layers to serve (default all); only their files are opened and only their
    banks allocated (a pipeline rank streams its own layers).
    """

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
        prefetch: str | None = None,
        policy: str = "lfu",
        hits_first: bool = True,
        layers: Iterable[int] | None = None,
    ):
        from ..layouts.plan import split_plan

        if prefetch is None:
            prefetch = default_prefetch()
        if prefetch not in PREFETCH_MODES:
            raise ValueError(
                f"prefetch must be one of {', '.join(PREFETCH_MODES)}, got {prefetch!r}"
            )
        self.prefetch_mode = prefetch
        self.hits_first = hits_first
        # Hits first computes a step's experts in two calls. Each routed expert's row is the
        # same whatever else is in the call on MLX's CPU backend (and the tiny test models on
        # CUDA), but not on CUDA at real sizes: at the 397B geometry a gather_qmm of 1-5 of the
        # 10 experts gives other bits than the 10-expert call (H200, measured), so there a step
        # with misses is computed whole once they landed.
        self.rows_exact = not cuda.on_cuda()
        # Start evaluating a decode step's expert output as soon as it is built, so the GPU computes
        # the experts while Python builds the rest of the layer and the next one (a benchmark
        # knob: off reproduces the lazy path for A/B runs).
        self.eager = True
        # Likewise the output of the attention of each MoE decoder layer
        # (``streaming.commit_early``), whenever the router syncs, and a decode token's experts
        # are launched before its router sync, over the bank's device table
        # (``slots_before_sync``; the sync then only confirms they were all resident). On CUDA
        # and the CPU, where they were measured: the device runs each piece while the host builds
        # the next (H200, 4 layers: early commits ~2 ms less router-sync wait per token; presync
        # ~0.6-1 ms less host time per token, +3 % tok/s on average; CPU: with read-ahead, half
        # the router-sync wait, ``overlap_measured``). Metal already commits command buffers
        # during a long eval, so there it would mostly add commits (unmeasured).
        self.eager_layers = self.presync = overlap_measured()
        # Presync for a batch of rows too (flashmoe-serve's batched decode). A batched step with
        # a miss is computed again whole, so the launch is wasted work; on the CPU, where that is
        # matmul time, 4 rows at the minimum bank ran 0.76-0.98 x with it
        # (``benchmarks/batched_presync.py``). On CUDA, as measured before: not restricted.
        self.presync_batched = cuda.on_cuda()
        # The decoder layers' norms too (a benchmark knob: measured, no gain with ``presync``,
        # whose router commit follows the post-attention norm at once).
        self.early_norms = False
        # With presync, a layer whose read-ahead is still landing waits for it before launching
        # its experts (``slots_before_sync``; a benchmark knob: False launches at once and
        # recomputes the steps routed to a guess that was still landing).
        self.guesses_before_launch = True
        from ..metal.policies import make_policy

        make_policy(policy)  # refuses an unknown name now, not at the first bank
        self.policy = policy
        self._ahead: dict[int, _Ahead] = {}
        # read-aheads that landed before their layer ran: their use is counted when it does
        self._landed_ahead: dict[int, _Ahead] = {}
        self._ahead_areas: list[_Area] = []
        self._open: Pending | None = None  # the last request, until its misses landed
        # every bank holds every expert of its layer (``complete``; kept up to date by
        # ``request`` and ``clear_banks``, so the per-token checks cost nothing)
        self._complete = False
        self.filled = False  # ``fill`` made every bank complete (``clear_banks`` undoes it)
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
        # staged reads copied in the pool: (layer, slot) -> device bases of the slot's tensors,
        # (area key, record) -> that staging record's chunks and copy-triple template
        self._dst_bases: dict[tuple[int, int], np.ndarray] = {}
        self._copy_templates: dict[tuple[int, int], tuple] = {}
        # CUDA (managed memory): reads land in pinned staging and are DMA'd to the slots
        # (metal/cuda.py says why); decided when the first bank exists. None elsewhere.
        self._cuda: cuda.CudaDevice | None = None
        self.residency = "host"
        self._staging: _Area | None = None
        self._copies_in_pool = False
        # layer -> (address of slot 0 of each component array, bytes per slot of each)
        self._bank_arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._component_offsets: np.ndarray | None = None
        wanted = None if layers is None else set(layers)
        entries = [e for e in index.layers if wanted is None or e.layer in wanted]
        if wanted is not None and len(entries) != len(wanted):
            missing = sorted(wanted - {e.layer for e in entries})
            raise ValueError(f"{self.root}: the layout has no MoE layer {missing[0]}")
        for entry in entries:
            path = safe_relative_path(self.root, entry.file, "layer file")
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise FileNotFoundError(f"{path}: layer file missing") from None
            if size != entry.size:
                raise ValueError(f"{path}: size {size} bytes, index says {entry.size} (truncated?)")
            self._paths[entry.layer] = str(path)
        for entry in entries:  # every bank now, not in the first forward pass
            self._allocate_bank(entry.layer)

    @property
    def syncs(self) -> bool:
        """Whether the MoE layers sync on their router (a bank not yet complete, or a trace)."""
        return self.trace is not None or not self._complete

    @property
    def complete(self) -> bool:
        """Every bank holds every expert of its layer: nothing is read or evicted again."""
        return self._complete

    def fill(self, progress: bool = False) -> float:
        """Read every expert of every layer into its bank (banks of every expert only), so that
        decoding never syncs on a router; the counters start from zero afterwards. ``progress``:
        a progress bar on stderr when it is a terminal (a large model takes a while). Returns the
        seconds taken."""
        if self.slots < self.index.num_experts:
            raise ValueError(
                f"a bank of {self.slots} slots cannot hold all {self.index.num_experts} experts"
            )
        from tqdm import tqdm

        t0 = time.perf_counter()
        everything = list(range(self.index.num_experts))
        size = len(everything) * self.index.expert_bytes
        with tqdm(
            total=len(self.banks) * size,
            unit="B",
            unit_scale=True,
            desc="reading every expert into the bank",
            disable=not (progress and sys.stderr.isatty()),
            leave=False,
        ) as bar:
            for layer in self.banks:
                self.ensure(layer, everything)
                bar.update(size)
        self.filled = True
        self.stats.reset()
        return time.perf_counter() - t0

    def bank(self, layer: int) -> ExpertBank:
        """The bank of ``layer`` (for inspection and benchmarks; the model goes through
        ``lookup``/``request``)."""
        return self.banks[layer]

    def _allocate_bank(self, layer: int) -> None:
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

    def arrays(self, layer: int) -> dict[str, mx.array]:
        """``layer``'s bank arrays by component name (``[slots, ...]`` each): what the model's
        expert projections compute over, with slot ids."""
        bank = self.banks[layer]
        return {c.name: a for c, a in zip(self.index.components, bank.arrays, strict=True)}

    def lookup(self, layer: int, indices: mx.array) -> mx.array | None:
        """Slot ids for ``indices`` without a sync, or None when the router must be synced.

        Only for one token whose every expert is resident for good (a complete bank, which is
        never written again, with no read in flight) and no routing trace: MLX then keeps
        pipelining the decode step.
        Its ``k`` distinct experts are all hits, so the counters stay exact.
        """
        bank = self.banks[layer]
        one_token = indices.size == indices.shape[-1]
        if not (bank.complete and one_token and self._quiet(layer)):
            return None
        self.stats.calls += 1
        self.stats.hits += indices.shape[-1]
        # slot e holds expert e in a bank of every expert: the ids are the slot ids (no gather)
        return indices if bank.identity else bank.device_table()[indices]

    def slots_before_sync(self, layer: int, indices: mx.array) -> tuple[mx.array, set[int]] | None:
        """Slot ids for a decode step's routed ``indices`` (lazy, not synced), from the bank's
        device table, and the experts read ahead for ``layer`` that are still landing; None
        where that is not allowed (``presync`` off, a trace, a request not waited for).

        A computation over them may start before the router is synced: the rows of the experts
        that turn out resident and were not landing are final (``confirm_resident`` tells
        whether all are); the other rows read an absent expert's slot 0 or a slot still being
        written, and must be discarded.
        """
        if not self.presync or self.trace is not None or self._open is not None:
            return None
        wait = self.guesses_before_launch and self._precision >= _WAIT_PRECISION
        if wait and layer in self._ahead:
            # the step most likely routes to a guess still landing, and a launch over it would
            # be computed again: wait for the guesses (the router runs on the GPU meanwhile)
            t0 = time.perf_counter()
            self._settle(layer)
            self.stats.io_seconds += time.perf_counter() - t0
        else:
            self._land_if_done(layer)
        return self.banks[layer].device_table()[indices], self._in_flight(layer)

    def confirm_resident(self, layer: int, experts: np.ndarray) -> bool:
        """Whether every one of ``experts`` (any shape) is resident, none of them still being
        read ahead for ``layer``; if so, books them as a ``request`` without misses would
        (policy, counters), minus its machinery (no fence: nothing is written)."""
        return self._book_resident(layer, experts) is not None

    def resident_slots(self, layer: int, experts: np.ndarray) -> mx.array | None:
        """Slot ids of ``experts`` (any shape) when ``confirm_resident``; else None (the caller
        goes through ``request``). For the common decode step whose experts are all hits."""
        self._land_if_done(layer)  # nothing is computed yet: landed guesses may be used
        slots = self._book_resident(layer, experts)
        return None if slots is None else mx.array(slots.astype(np.uint32))

    def _book_resident(self, layer: int, experts: np.ndarray) -> np.ndarray | None:
        """``confirm_resident``, returning the slots of ``experts`` (None: not all resident)."""
        if self.trace is not None or self._open is not None:
            return None
        bank = self.banks[layer]
        slots = bank.table[experts]
        if (slots < 0).any():
            return None
        unique = np.unique(experts)  # what request gets: distinct ids, in this order
        routed = unique.tolist()
        # guesses for this layer may still be landing: only a routed one must be waited for
        # (``request`` does), the others keep landing in their own slots
        if layer in self._ahead and not self._in_flight(layer).isdisjoint(routed):
            return None
        self._note_routed(layer, routed)
        bank.policy.touch(routed)
        self.stats.calls += 1
        self.stats.hits += unique.size
        return slots

    def _quiet(self, layer: int) -> bool:
        """No trace is written and no read is in flight for ``layer``."""
        return self.trace is None and self._open is None and layer not in self._ahead

    def record(self, layer: int, routed: np.ndarray) -> None:
        """Add ``routed`` (tokens x k ids) to the routing trace, if one is being written; a hit
        is an expert resident (or being read ahead) before this call."""
        if self.trace is not None:
            self.trace.record(layer, routed, self.banks[layer].table[routed] >= 0)

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
        pending = self.request(layer, experts)
        pending.wait()
        return pending.bank

    def request(self, layer: int, experts: list[int]) -> Pending:
        """Start making ``experts`` (distinct ids) resident; return before the misses land.

        The hits (``Pending.hits``) may be computed at once; ``Pending.wait()`` returns when the
        misses are in their slots too. Read-ahead for ``layer`` is waited for only where it
        holds experts asked for here; the rest keeps landing in the background.
        """
        bank = self.banks[layer]
        t0 = time.perf_counter()
        self.land_open()
        needed = set(experts)
        self._note_routed(layer, needed)
        # guesses still landing keep their slots (a routed one counts as a hit): the misses'
        # reads are submitted first, and the routed guesses are waited for after that
        keep = self._in_flight(layer)
        if len(keep | needed) > self.slots:  # no room beside the guesses still landing
            self._settle(layer)
            keep = set()
        bank.fence()
        hits, misses = bank.assign(experts, keep=keep)
        self.stats.calls += 1
        self.stats.hits += len(hits)
        pending = Pending(self, layer, bank, hits, misses)
        if misses:
            self.stats.misses += len(misses)
            self.stats.per_layer_misses[layer] = self.stats.per_layer_misses.get(layer, 0) + len(
                misses
            )
            area = self._staging
            step = area.records if area is not None else len(misses)
            for i in range(0, len(misses), step):
                if pending.batch is not None:  # staging is reused: the last round must land first
                    pending.land()
                part = misses[i : i + step]
                requests, nbytes = self._requests(layer, bank, part, area)
                try:
                    batch = self.reader.submit(requests)
                except BaseException:
                    bank.abort(misses)
                    raise
                pending.batch, pending.part, pending.nbytes = batch, part, nbytes
            self._open = pending
            if bank.complete:  # the last expert of this bank: maybe of every bank
                self._complete = all(b.complete for b in self.banks.values())
        self._settle(layer, needed=needed)  # the routed guesses, while the misses are read
        self.stats.io_seconds += time.perf_counter() - t0
        return pending

    def land_open(self) -> None:
        """Finish the last ``request`` if its caller never waited (an error between the two)."""
        if self._open is not None:
            self._open.wait()

    def _in_flight(self, layer: int) -> set[int]:
        """Experts of ``layer`` still being read ahead (their slots must not be handed out)."""
        ahead = self._ahead.get(layer)
        if ahead is None:
            return set()
        return {e for i, (e, _) in enumerate(ahead.misses) if i not in ahead.landed}

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

        Guesses take slots like misses (evicted by the bank policy, never a guessed expert);
        at most half the bank is guessed. ``request(layer, ...)`` waits for the guesses it uses
        before it touches them. Only residency changes: what is computed never does.
        """
        if layer not in self._paths:
            return
        if layer in self._ahead:
            self._settle(layer)  # the last guesses for this layer (long landed by now)
        self._note_routed(layer, ())  # guesses whose layer never ran: none was used
        area = None
        if self._staging is not None:
            area = self._free_ahead_area()
        bank = self.banks[layer]
        bank.fence()
        guess = list(experts)[: max(1, self.slots // 2)]
        _, misses = bank.assign(guess)
        if area is not None and len(misses) > area.records:
            bank.abort(misses[area.records :])
            misses = misses[: area.records]
        if not misses:
            return
        requests, nbytes = self._requests(layer, bank, misses, area)
        try:
            batch = self.reader.submit(requests)
        except BaseException:
            bank.abort(misses)
            raise
        self._ahead[layer] = _Ahead(batch, misses, nbytes, time.perf_counter(), area)
        self.stats.prefetch_experts += len(misses)
        self.stats.prefetch_bytes += nbytes

    def _free_ahead_area(self) -> _Area:
        """A pinned read-ahead area no guess in flight uses (two alternate: one layer's unused
        guesses may still be landing while the next layer's are read)."""
        busy = {id(a.area) for a in self._ahead.values()}
        for area in self._ahead_areas:
            if id(area) not in busy:
                return area
        if len(self._ahead_areas) < 2:
            records = max(1, min(self.slots // 2, 32))
            view = self._cuda.pinned(records * self.index.record_size)
            area = _Area(view, records, -2 - len(self._ahead_areas))
            self._ahead_areas.append(area)
            return area
        oldest = min(self._ahead, key=lambda layer: self._ahead[layer].started)
        area = self._ahead[oldest].area
        self._settle(oldest)
        return area

    def _settle(self, layer: int, needed: set[int] | None = None) -> None:
        """Land ``layer``'s read-ahead: the guesses in ``needed`` (all when None), the rest later."""
        ahead = self._ahead.get(layer)
        if ahead is None:
            return
        partial = needed is not None and hasattr(ahead.batch, "wait_for")
        take = [
            i
            for i, (e, _) in enumerate(ahead.misses)
            if i not in ahead.landed and (not partial or e in needed)
        ]
        if take:
            bank = self.banks[layer]
            try:
                if partial:
                    per = len(self.plan)  # requests per expert, in expert order
                    for lo, hi in _runs(take):
                        ahead.batch.wait_for(lo * per, hi * per)
                else:
                    ahead.batch.wait()
                self._finish(layer, bank, [(i, *ahead.misses[i]) for i in take], ahead.area)
            except BaseException:
                _drain(ahead.batch)
                bank.abort([m for i, m in enumerate(ahead.misses) if i not in ahead.landed])
                del self._ahead[layer]
                raise
            ahead.landed.update(take)
            self.stats.bytes_read += len(take) * ahead.record_bytes
        if len(ahead.landed) == len(ahead.misses):
            del self._ahead[layer]
            self.stats.prefetch_seconds += time.perf_counter() - ahead.started
            if not ahead.counted:  # landed before its layer ran
                self._landed_ahead[layer] = ahead

    def _land_if_done(self, layer: int) -> None:
        """Land the guesses of ``layer``'s read-ahead whose reads have finished (asking, not
        waiting: ``done_for``, or ``done`` for the whole batch), so that what is computed from
        here on may use them as resident. A batch with neither lands when waited for."""
        ahead = self._ahead.get(layer)
        if ahead is None:
            return
        batch = ahead.batch
        if hasattr(batch, "done_for") and hasattr(batch, "wait_for"):
            per = len(self.plan)  # requests per expert, in expert order
            ready = {
                e
                for i, (e, _) in enumerate(ahead.misses)
                if i not in ahead.landed and batch.done_for(i * per, (i + 1) * per)
            }
            if ready:
                self._settle(layer, needed=ready)
        elif getattr(batch, "done", None) is not None and batch.done():
            self._settle(layer)

    def _note_routed(self, layer: int, routed: Iterable[int]) -> None:
        """``layer`` runs with ``routed`` experts: count how many of its guesses were used."""
        landed = self._landed_ahead.pop(layer, None)
        ahead = self._ahead.get(layer) or landed
        if ahead is not None:
            self._count_used(ahead, routed)

    def _count_used(self, ahead: _Ahead, needed: Iterable[int]) -> None:
        """Count, at the first step routed through ``ahead``'s layer, how many guesses it used."""
        if not ahead.counted:
            ahead.counted = True
            needed = set(needed)
            used = sum(1 for e, _ in ahead.misses if e in needed)
            self.stats.prefetch_used += used
            self.stats.prefetch_unused_bytes += (len(ahead.misses) - used) * ahead.record_bytes
            self._precision = 0.8 * self._precision + 0.2 * used / len(ahead.misses)

    def settle_all(self) -> None:
        """Wait for every read in flight (before closing, or emptying the banks)."""
        self.land_open()
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
            for i, (e, slot) in enumerate(part):
                dst = self._slot_bases(layer, slot)
                chunks, template, comp, bounds = self._staged_copies(area, i)
                triples = template.copy()  # (dst offset, src, bytes) per piece; dst += its base
                triples[:, 0] += dst[comp]
                packed = triples.tobytes()
                for (start, bufs, length), lo, hi in zip(chunks, bounds, bounds[1:], strict=False):
                    requests.append((fd, e * record + start, bufs, path, packed[lo:hi]))
                    nbytes += length
        else:
            for i, (e, _) in enumerate(part):
                for start, bufs, length, *_ in self._staged_chunks(area, i):
                    requests.append(ReadRequest(fd, e * record + start, bufs, path))
                    nbytes += length
        return requests, nbytes

    def _finish(self, layer: int, bank: ExpertBank, part, area: _Area | None) -> None:
        """After the reads of ``part`` ((staging record, expert, slot) triples) ended: verify
        them, and with a reader that does not copy in the pool, move them to the device."""
        record = self.index.record_size
        if self.verify:
            if area is None:
                records = [(e, bank.slot_buffers(slot)) for _, e, slot in part]
            else:
                size = self.index.expert_bytes
                records = [(e, (area.view[i * record : i * record + size],)) for i, e, _ in part]
            self._check(layer, records)
        if area is not None and not self._copies_in_pool:
            base = cuda.address(area.view)
            copies = []
            for i, _, slot in part:
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
                [(a + slot * n, n) for _, _, slot in part for a, n in self._ranges(layer, bank)]
            )
            self._cuda.synchronize()

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

    def _slot_bases(self, layer: int, slot: int) -> np.ndarray:
        """Per component of ``layer``'s bank: the device address of ``slot``'s tensor minus the
        component's offset in the record (+ a record offset = where that byte goes)."""
        key = (layer, slot)
        bases = self._dst_bases.get(key)
        if bases is None:
            addrs, sizes = self._bank_arrays[layer]
            bases = addrs + np.uint64(slot) * sizes - self._component_offsets
            self._dst_bases[key] = bases
        return bases

    def _staged_copies(self, area: _Area, i: int):
        """Staging record ``i``'s chunks as (start, views, length), with the copy triples of all
        of them in one array: ``template`` rows (record offset, host address, bytes), the
        component of each row, and each chunk's byte range in ``template.tobytes()``. Per
        expert, the request builder then adds the slot's bases to one column (no per-chunk
        numpy work on the hot path)."""
        key = (area.key, i)
        cached = self._copy_templates.get(key)
        if cached is None:
            src = np.uint64(cuda.address(area.view) + i * self.index.record_size)
            chunks, rows, comps, bounds = [], [], [], [0]
            for start, bufs, length, comp, lo, n in self._staged_chunks(area, i):
                chunks.append((start, bufs, length))
                rows.append(np.stack([lo, src + lo, n], axis=1))
                comps.append(comp)
                bounds.append(bounds[-1] + comp.size * 3 * 8)
            template = np.concatenate(rows).astype(np.uint64)
            cached = (chunks, template, np.concatenate(comps), bounds)
            self._copy_templates[key] = cached
        return cached

    def clear_banks(self) -> None:
        """Empty every bank (as right after loading); the next calls read all their experts."""
        self.settle_all()
        for bank in self.banks.values():
            bank.fence()
            bank.clear()
        self._landed_ahead.clear()
        self._complete = self.filled = False

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


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices as half-open runs: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


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
