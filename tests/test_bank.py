"""The expert slot bank: slot assignment, LRU eviction, failed reads, and the ordering rule."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from flashmoe.metal.bank import BankFullError, ExpertBank

COMPONENTS = [("w", "U32", [2, 4]), ("s", "BF16", [2, 1]), ("b", "F16", [2, 1])]


def make_bank(slots=3, experts=8):
    return ExpertBank(slots, COMPONENTS, num_experts=experts)


def test_misses_get_free_slots_then_hits():
    bank = make_bank()
    hits, misses = bank.assign([5, 2])
    assert hits == [] and [e for e, _ in misses] == [5, 2]
    assert len({s for _, s in misses}) == 2
    hits, misses = bank.assign([2, 7])
    assert hits == [2] and [e for e, _ in misses] == [7]


def test_lru_eviction_never_evicts_needed_experts():
    bank = make_bank(slots=3)
    bank.assign([0, 1, 2])
    bank.assign([0])  # 1 is now least recently used, then 2
    hits, misses = bank.assign([0, 3])
    assert hits == [0] and misses[0][0] == 3
    assert set(bank.slot_of) == {0, 2, 3}
    hits, misses = bank.assign([4, 3, 2])  # 0 is the only one not needed
    assert set(bank.slot_of) == {2, 3, 4}
    assert sorted(bank.slot_of.values()) == [0, 1, 2]


def test_more_experts_than_slots_is_an_error():
    with pytest.raises(BankFullError):
        make_bank(slots=2).assign([0, 1, 2])


def test_abort_frees_the_slots_of_failed_reads():
    bank = make_bank()
    _, misses = bank.assign([1, 2])
    bank.abort(misses[1:])
    assert set(bank.slot_of) == {1}
    assert bank.table[2] == -1
    _, misses = bank.assign([2, 3])
    assert {e for e, _ in misses} == {2, 3}


def test_slot_ids_and_slot_buffers_address_the_right_bytes():
    bank = make_bank()
    _, misses = bank.assign([6, 1])
    for e, slot in misses:
        for view in bank.slot_buffers(slot):
            view[:] = bytes([e]) * view.nbytes
    ids = bank.slot_ids(np.array([[1, 6], [6, 6]]))
    w = np.array(bank.arrays[0])
    picked = w[np.array(ids)]
    assert (picked.view(np.uint8)[0, 0] == 1).all() and (picked.view(np.uint8)[0, 1] == 6).all()
    with pytest.raises(KeyError):
        bank.slot_ids(np.array([3]))


def test_fence_evaluates_pending_work_before_a_slot_is_overwritten():
    bank = make_bank(slots=1)
    (view,) = bank.slot_buffers(0)[:1]
    view[:] = np.full(view.nbytes // 4, 7, dtype=np.uint32).tobytes()
    lazy = bank.arrays[0] + 0  # a computation built over the bank, not yet run
    bank.add_pending(lazy)
    bank.fence()
    view[:] = np.full(view.nbytes // 4, 9, dtype=np.uint32).tobytes()
    assert (np.array(lazy) == 7).all()
    # Without the fence the pending graph reads whatever the slot holds when it runs: that is
    # the hazard the ordering rule prevents.
    unfenced = bank.arrays[0] + 0
    view[:] = np.full(view.nbytes // 4, 11, dtype=np.uint32).tobytes()
    assert (np.array(unfenced) == 11).all()
    mx.eval(bank.arrays)


def test_resident_slots_keeps_the_books_of_request(layout):
    """The all-hit fast path counts and touches exactly as a request without misses does."""
    import numpy as np
    from flashmoe.runtime import load

    _, out = layout("qwen3_5_moe")
    stores = [load(str(out), bank_experts=8)[0].flashmoe.store for _ in range(2)]
    layer = min(stores[0].banks)
    for store in stores:
        store.ensure(layer, list(range(8)))
        store.stats.reset()
    calls = [np.array([[[3, 1, 5, 0]]]), np.array([[[7, 2, 1, 6]], [[2, 4, 3, 7]]])]
    for experts in calls:
        slots = stores[0].resident_slots(layer, experts)
        pending = stores[1].request(layer, np.unique(experts).tolist())
        assert not pending.misses
        assert np.array_equal(np.array(slots), np.array(pending.slot_ids(experts)))
    a, b = (s.stats for s in stores)
    assert (a.calls, a.hits, a.misses) == (b.calls, b.hits, b.misses) == (2, 4 + 6, 0)
    policies = [s.banks[layer].policy for s in stores]
    assert policies[0]._count == policies[1]._count  # LFU: the same counts
    assert policies[0].victims(3, set()) == policies[1].victims(3, set())
    assert stores[0].resident_slots(layer, np.array([[[9, 1, 2, 3]]])) is None  # 9 not resident
