"""Bank eviction policies beyond LRU, with ``metal.bank.LRUPolicy``'s interface.

``touch(experts)`` is called once per bank call with the call's experts (hits and the misses just
assigned), ``remove(expert)`` when an expert leaves the bank, ``victims(count, keep)`` returns
``count`` resident experts to evict, never one in ``keep``. ``flashmoe-bench policy`` replays the
same rules offline (``bench/policy.py``); ties are broken by recency (least recent first).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from .bank import LRUPolicy

AGE_STEPS = 256  # LFU halves every count after this many bank calls


class LFUPolicy:
    """Least frequently used, with ageing: counts halve every ``age_steps`` calls."""

    def __init__(self, age_steps: int = AGE_STEPS) -> None:
        self.age_steps = age_steps
        self._count: dict[int, float] = {}
        self._last: dict[int, int] = {}
        self._calls = 0

    def touch(self, experts: Iterable[int]) -> None:
        self._calls += 1
        for e in experts:
            self._count[e] = self._count.get(e, 0.0) + 1.0
            self._last[e] = self._calls
        if self._calls % self.age_steps == 0:
            for e in self._count:
                self._count[e] *= 0.5

    def remove(self, expert: int) -> None:
        self._count.pop(expert, None)
        self._last.pop(expert, None)

    def victims(self, count: int, keep: set[int]) -> list[int]:
        # tuples built in one comprehension: a key function called per expert costs ~4 x more;
        # the position keeps ties in insertion order, as ``nsmallest(key=...)`` did
        prio, last = self._priority(), self._last
        ranked = [(prio[e], last[e], i, e) for i, e in enumerate(self._count) if e not in keep]
        return [r[3] for r in heapq.nsmallest(count, ranked)]

    def _priority(self) -> dict[int, float]:
        return self._count


class LFUDAPolicy(LFUPolicy):
    """LFU with dynamic ageing: priority = uses while resident + the priority of the last victim."""

    def __init__(self) -> None:
        super().__init__(age_steps=0)
        self._clock = 0.0
        self._prio: dict[int, float] = {}

    def touch(self, experts: Iterable[int]) -> None:
        self._calls += 1
        for e in experts:
            self._count[e] = self._count.get(e, 0.0) + 1.0
            self._last[e] = self._calls
            self._prio[e] = self._count[e] + self._clock

    def remove(self, expert: int) -> None:
        prio = self._prio.pop(expert, None)
        if prio is not None:
            self._clock = max(self._clock, prio)
        super().remove(expert)

    def _priority(self) -> dict[int, float]:
        return self._prio


class PinnedLRUPolicy(LRUPolicy):
    """LRU that never evicts the ``pinned`` experts (a hot set profiled from a trace)."""

    def __init__(self, pinned: Iterable[int]) -> None:
        super().__init__()
        self.pinned = frozenset(pinned)

    def victims(self, count: int, keep: set[int]) -> list[int]:
        out = super().victims(count, keep | self.pinned)
        if len(out) < count:  # too much pinned for this call: evict pinned ones, LRU first
            out += [e for e in super().victims(count, keep) if e not in out][: count - len(out)]
        return out


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "lfuda": LFUDAPolicy}


def make_policy(name: str, pinned: Iterable[int] = ()):
    """A fresh policy for one bank: ``lru``, ``lfu``, ``lfuda``, or ``pin`` (with ``pinned``)."""
    if name == "pin":
        return PinnedLRUPolicy(pinned)
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown bank policy {name!r} (known: lru, lfu, lfuda, pin)") from None
