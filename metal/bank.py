"""The expert slot bank: per MoE layer, stable MLX arrays that hold the resident experts.

For each of the nine components a bank owns one array ``[slots, *per_expert_shape]`` (a Metal
buffer on Apple silicon, plain memory on the CPU backend). Experts are read straight into a slot's
bytes (the reader scatters one record into nine per-component views), and the model computes with
``gather_qmm`` over the whole bank using slot ids, so no per-token expert array is ever built.

Ordering rule (why ``fence()`` exists): MLX is lazy, and a graph built over the bank reads the
slot bytes when it *runs*, not when it is built. A slot may therefore only be overwritten after
every computation that was built over the bank has been evaluated. Every output computed from a
bank is registered with ``add_pending``; ``fence()`` evaluates them and must be called before any
write. In decode this is free (the previous token's outputs are already evaluated when the router
of the next token is synced); it matters when one call splits its tokens into groups.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import mlx.core as mx
import numpy as np

from ..layouts.dtypes import mlx_dtype


class BankFullError(RuntimeError):
    """More distinct experts are needed at once than the bank has slots."""


class LRUPolicy:
    """Least recently used eviction over expert ids."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def touch(self, experts: Iterable[int]) -> None:
        for e in experts:
            self._order[e] = None
            self._order.move_to_end(e)

    def remove(self, expert: int) -> None:
        self._order.pop(expert, None)

    def victims(self, count: int, keep: set[int]) -> list[int]:
        """``count`` resident experts to evict, least recently used first, never one in ``keep``."""
        out = []
        for e in self._order:
            if len(out) == count:
                break
            if e not in keep:
                out.append(e)
        return out


_MAX_PENDING = 16


class ExpertBank:
    """Slots for the experts of one MoE layer.

    ``components`` is a list of ``(name, dtype, shape)`` in record order (dtype in safetensors
    spelling). ``policy``: a factory of eviction policies (``LRUPolicy`` by default;
    ``metal.policies.make_policy``). ``assign(experts)`` makes room for a set of experts and returns which of them must be
    read and into which slot; ``abort`` takes back the slots of reads that failed. ``table`` (expert
    -> slot, -1 when absent) is the one record of which expert sits where.
    """

    def __init__(
        self,
        slots: int,
        components: list[tuple[str, str, list[int]]],
        *,
        num_experts: int,
        policy=None,
        page_aligned: int = 0,
    ):
        if slots < 1:
            raise ValueError("a bank needs at least one slot")
        self.slots = slots
        self.arrays: list[mx.array] = [
            self._allocate((slots, *shape), mlx_dtype(dtype), page_aligned)
            for _, dtype, shape in components
        ]
        mx.eval(self.arrays)
        # Writable byte views of each component array, and per-slot slices of them: the
        # destinations of the reads. memoryview(mx.array) is the array's own buffer (no copy).
        self._views = [memoryview(a).cast("B") for a in self.arrays]
        self.slot_nbytes = [v.nbytes // slots for v in self._views]
        self._new_policy = policy or LRUPolicy  # a factory: each (re)start gets a fresh one
        self.policy = self._new_policy()
        self.free = list(range(slots - 1, -1, -1))  # stack; slot 0 used first
        self.table = np.full(num_experts, -1, dtype=np.int64)  # expert -> slot, -1 if absent
        self._pending: list[mx.array] = []
        self._device_table: mx.array | None = None

    @staticmethod
    def _allocate(shape: tuple, dtype, page_aligned: int) -> mx.array:
        """A zeroed array; with ``page_aligned`` its data starts on such a boundary (O_DIRECT).

        MLX buffers start at no particular page offset, so an aligned array is a zero-copy view
        into a byte buffer allocated one page larger.
        """
        if not page_aligned:
            return mx.zeros(shape, dtype=dtype)
        nbytes = int(np.prod(shape)) * dtype.size
        raw = mx.zeros((nbytes + page_aligned,), dtype=mx.uint8)
        mx.eval(raw)
        address = np.frombuffer(memoryview(raw), dtype=np.uint8).ctypes.data
        skip = -address % page_aligned
        return raw[skip : skip + nbytes].view(dtype).reshape(shape)

    @property
    def slot_of(self) -> dict[int, int]:
        """Resident expert -> slot (derived from ``table``; for inspection, not the hot path)."""
        return {int(e): int(self.table[e]) for e in np.flatnonzero(self.table >= 0)}

    @property
    def identity(self) -> bool:
        """The bank has a slot for every expert, and expert e always sits in slot e."""
        return self.slots == self.table.size

    @property
    def complete(self) -> bool:
        """Every expert of the layer is resident: nothing will ever be read or evicted again."""
        return len(self.free) == 0 and self.identity

    def device_table(self) -> mx.array:
        """The expert -> slot table as an MLX array (for mapping ids without a sync).

        An absent expert maps to slot 0, so that a lookup is always a valid index: a
        computation over an absent expert's id reads some resident expert and is discarded.
        """
        if self._device_table is None:
            self._device_table = mx.array(np.maximum(self.table, 0).astype(np.uint32))
        return self._device_table

    def slot_buffers(self, slot: int) -> tuple[memoryview, ...]:
        """The nine destination views of ``slot``, in record order."""
        return tuple(
            v[slot * n : (slot + 1) * n] for v, n in zip(self._views, self.slot_nbytes, strict=True)
        )

    def assign(
        self, experts: list[int], keep: set[int] = frozenset()
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Make every expert in ``experts`` (distinct ids) resident-or-assigned.

        Returns ``(hits, misses)`` where ``misses`` are ``(expert, slot)`` pairs to read. Evicts
        experts by the policy, never one in ``experts`` or ``keep`` (slots still being written).
        Raises BankFullError when ``len(experts) > slots`` or too few slots can be evicted.
        """
        if len(experts) > self.slots:
            raise BankFullError(
                f"{len(experts)} experts needed at once, bank has {self.slots} slots"
            )
        needed = set(experts) | keep
        resident = self.table[experts] >= 0
        hits = [e for e, r in zip(experts, resident, strict=True) if r]
        missing = [e for e, r in zip(experts, resident, strict=True) if not r]
        shortfall = len(missing) - len(self.free)
        if shortfall > 0:
            victims = self.policy.victims(shortfall, needed)
            if len(victims) < shortfall:
                raise BankFullError(
                    f"{len(experts)} experts needed at once, {len(keep)} slots still being read"
                )
            for victim in victims:
                self.free.append(int(self.table[victim]))
                self.table[victim] = -1
                self.policy.remove(victim)
        misses = []
        for e in missing:
            # a bank of every expert never evicts: expert e goes to slot e (its slot is free
            # while e is absent), so a complete bank maps ids to themselves (``identity``)
            if self.identity:
                self.free.remove(e)
                slot = e
            else:
                slot = self.free.pop()
            self.table[e] = slot
            misses.append((e, slot))
        self.policy.touch(experts)
        if misses:
            self._device_table = None
        return hits, misses

    def clear(self) -> None:
        """Forget every resident expert (the slots' bytes stay; call ``fence()`` first)."""
        self.table[:] = -1
        self.free = list(range(self.slots - 1, -1, -1))
        self.policy = self._new_policy()
        self._device_table = None

    def abort(self, misses: list[tuple[int, int]]) -> None:
        """Forget experts whose reads failed: their slots hold garbage and go back to the free list."""
        for e, slot in misses:
            if self.table[e] == slot:
                self.table[e] = -1
                self._device_table = None
                self.policy.remove(e)
                self.free.append(slot)

    def slot_ids(self, experts: np.ndarray) -> mx.array:
        """Map an array of resident expert ids to slot ids (same shape, uint32)."""
        slots = self.table[experts]
        if (slots < 0).any():
            raise KeyError("slot_ids() asked for an expert that is not resident")
        return mx.array(slots.astype(np.uint32))

    def add_pending(self, out: mx.array) -> None:
        self._pending.append(out)
        if len(self._pending) > _MAX_PENDING:
            # calls with hits only add and never fence: evaluate (long done) the oldest, so
            # the list stays short
            self.fence()

    def fence(self) -> None:
        """Evaluate every computation built over this bank (see the ordering rule above)."""
        if self._pending:
            mx.eval(self._pending)
            self._pending.clear()
