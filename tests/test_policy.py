"""flashmoe-bench policy: replay correctness on hand-made traces, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flashmoe.bench import cli
from flashmoe.bench.policy import POLICIES, _pinned, demand, replay
from flashmoe.metal.bank import LRUPolicy
from flashmoe.metal.policies import make_policy
from flashmoe.runtime.trace import TraceWriter, read_trace


def _write(path, routes: list[np.ndarray], num_experts: int, expert_bytes: int = 1_000_000):
    """routes[layer] is steps x k: one decode token per step."""
    k = routes[0].shape[1]
    meta = {"expert_bytes": expert_bytes}
    with TraceWriter(
        path, num_layers=len(routes), num_experts=num_experts, top_k=k, meta=meta
    ) as w:
        for step in range(routes[0].shape[0]):
            for layer, r in enumerate(routes):
                w.record(layer, r[step : step + 1], np.zeros((1, k), bool))
    return demand(read_trace(path))


def test_hand_made_trace_lru_and_belady(tmp_path):
    # one layer, top-1, 2 slots: a b c a b d a b
    seq = np.array([[0], [1], [2], [0], [1], [3], [0], [1]])
    d = _write(tmp_path / "t.fmt", [seq], 4)
    lru = replay(d, "lru", "layer", 2, 1_000_000)
    assert (lru.hits, lru.misses) == (0, 8)  # LRU always evicts the one needed next
    opt = replay(d, "belady", "layer", 2, 1_000_000)
    # belady: a b | c evicts b (a is next) | a hit | b evicts c (never again) | d evicts b
    # (a is needed first) | a hit | b
    assert (opt.hits, opt.misses) == (2, 6)
    assert opt.mb_per_token == pytest.approx(6 / 8)


def _reference(route: np.ndarray, slots: int, policy=None) -> int:
    """Hits of a runtime policy (default LRUPolicy) with the bank's assign rule, one layer."""
    policy, resident, hits = policy or LRUPolicy(), set(), 0
    for row in route:
        need = sorted(set(row.tolist()))
        hits += sum(e in resident for e in need)
        missing = [e for e in need if e not in resident]
        short = len(resident) + len(missing) - slots
        if short > 0:
            for v in policy.victims(short, set(need)):
                resident.discard(v)
                policy.remove(v)
        resident.update(missing)
        policy.touch(need)
    return hits


def test_lru_replay_matches_the_runtime_policy_and_belady_is_the_ceiling(tmp_path):
    rng = np.random.default_rng(0)
    p = np.linspace(3, 0.2, 24)
    routes = [rng.choice(24, size=(400, 1), p=p / p.sum()) for _ in range(3)]
    d = _write(tmp_path / "t.fmt", routes, 24)
    for slots in (2, 5, 9):
        lru = replay(d, "lru", "layer", 3 * slots, 1)
        assert lru.hits == sum(_reference(r, slots) for r in routes)
    # top-4 steps (ties inside a step): Belady bounds every policy, at every size and scope
    routes = [np.argsort(rng.random((300, 24)) - 0.03 * np.arange(24), axis=1)[:, :4] for _ in "ab"]
    d = _write(tmp_path / "t4.fmt", routes, 24)
    for slots in (4, 8, 16):
        for scope in ("layer", "global"):
            got = {p: replay(d, p, scope, 2 * slots, 1).hit_rate for p in POLICIES}
            assert all(got["belady"] >= v for v in got.values()), got
            if slots == 4:  # a bank of top-k slots leaves no choice
                assert len(set(got.values())) == 1, got
            else:
                assert got["belady"] > got["lru"], got
    full = replay(d, "lru", "layer", 48, 1)  # every expert fits: only compulsory misses
    assert full.misses == sum(np.unique(r).size for r in routes)


def test_global_equals_per_layer_with_one_layer(tmp_path):
    rng = np.random.default_rng(1)
    d = _write(tmp_path / "t.fmt", [np.argsort(rng.random((200, 16)), axis=1)[:, :2]], 16)
    for policy in POLICIES:
        a, b = (replay(d, policy, scope, 6, 1) for scope in ("layer", "global"))
        assert (a.hits, a.misses) == (b.hits, b.misses), policy


def test_cli(tmp_path, capsys):
    rng = np.random.default_rng(2)
    _write(tmp_path / "t.fmt", [np.argsort(rng.random((100, 16)), axis=1)[:, :2]] * 2, 16)
    out = tmp_path / "r.json"
    argv = ["policy", str(tmp_path / "t.fmt"), "--slots", "4", "8", "--json", str(out)]
    argv += ["--budget", "0.00001", "--expert-mb", "0.001", "--plot", str(tmp_path / "p.png")]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 3 * len(POLICIES) * 2  # slots 4, 8 and 5 (10737 B / 1000 B, 2 layers)
    assert sorted({r["slots"] for r in rows}) == [8, 10, 16]
    assert "belady" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["lru", "lfu", "lfuda", "pin"])
def test_runtime_policy_classes_match_the_replay(tmp_path, name):
    rng = np.random.default_rng(4)
    p = np.linspace(4, 0.1, 40)
    route = rng.choice(40, size=(1500, 1), p=p / p.sum())  # top-1: no ties inside a step
    d = _write(tmp_path / "t.fmt", [route], 40)
    for slots in (3, 8):
        pinned = np.flatnonzero(_pinned(d, slots, "layer")[0]) if name == "pin" else ()
        want = _reference(route, slots, make_policy(name, pinned))
        assert replay(d, name, "layer", slots, 1).hits == want
    with pytest.raises(ValueError):
        make_policy("fifo")


def test_decode_only_counts_one_token_steps(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "t.fmt"
    with TraceWriter(path, num_layers=2, num_experts=32, top_k=2, meta={}) as w:
        for step in range(30):
            rows = 6 if step in (0, 10) else 1  # two prefill chunks among decode steps
            for layer in (0, 1):
                w.record(
                    layer,
                    np.argsort(rng.random((rows, 32)), axis=1)[:, :2],
                    np.zeros((rows, 2), bool),
                )
    d = demand(read_trace(path))
    assert d.rows.tolist() == [6 if s in (0, 10) else 1 for s in range(30)]
    for slots in (8, 20):  # 8: the prefill chunks do not fit and pass through
        every = replay(d, "lru", "layer", 2 * slots, 1_000_000)
        dec = replay(d, "lru", "layer", 2 * slots, 1_000_000, decode_only=True)
        assert dec.hits + dec.misses == 28 * 2 * 2
        assert dec.mb_per_token == pytest.approx(dec.misses / 28)
        assert every.hits + every.misses > dec.hits + dec.misses
