"""``flashmoe-bench policy``: replay routing traces through expert-bank policies, offline.

Each step (one call per MoE layer: a decode token, or a prefill chunk) needs its distinct experts
resident at once, as in the runtime: hits are the needed experts already resident, misses are read
(``expert_bytes`` each) after evicting the policy's victims among the experts the step does not
need. A step that needs more experts than a bank holds (a long prefill chunk, which the runtime
splits into groups) counts its resident experts as hits and the rest as misses, and changes
nothing. All layers of a step are replayed together, vectorized over layers, so 100k tokens x 60
layers take seconds per policy and budget rather than minutes.

Policies: ``lru`` (the runtime's today), ``lfu`` (frequency halved every ``AGE_STEPS`` steps),
``lfuda`` (LFU with dynamic ageing), ``pin`` (the trace's most used experts, in half of the slots,
are never evicted once resident; LRU for the rest: an oracle profile, an upper bound for a profiled
pin),
``belady`` (evict the expert used again farthest in the future: the ceiling). Each runs with equal
per-layer banks (``layer``) and with one budget shared by all layers (``global``). Ties are
broken by recency. The rules are ``metal/policies.py``'s (the runtime's classes).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..metal.policies import AGE_STEPS
from ..runtime.trace import Trace, read_trace

GiB = 1 << 30
POLICIES = ("lru", "lfu", "lfuda", "pin", "belady")
SCOPES = ("layer", "global")
PIN_FRACTION = 0.5
NEVER = np.inf
PINNED = 1e300


@dataclass
class Demand:
    """A trace as steps: the distinct (layer, expert) pairs each step needs, in step order."""

    num_layers: int
    num_experts: int
    ptr: np.ndarray  # step s needs pairs ptr[s]:ptr[s + 1]
    layer: np.ndarray
    expert: np.ndarray
    next_use: np.ndarray  # step at which the same (layer, expert) is needed next (inf: never)
    tokens: int
    rows: np.ndarray  # token rows per step (first layer): 1 for a decode step
    layers: list[int]
    step_need: np.ndarray  # per step, the most distinct experts it needs in one layer

    @property
    def max_need(self) -> int:
        return int(self.step_need.max()) if self.step_need.size else 0

    @property
    def steps(self) -> int:
        return self.ptr.size - 1


def demand(trace: Trace) -> Demand:
    layers = sorted(trace.layers)
    E = trace.num_experts
    L = max(layers) + 1
    first = trace.layers[layers[0]]
    decode = all(np.array_equal(trace.layers[la].step, first.step) for la in layers) and bool(
        np.all(np.diff(first.step.astype(np.int64)) > 0)
    )
    if decode:  # one row per step and layer: rows are sorted, so is the step-major order
        k = first.experts.shape[1]
        expert = np.stack([trace.layers[la].experts for la in layers], axis=1).ravel()
        step = np.repeat(np.arange(first.step.size, dtype=np.int32), len(layers) * k)
        layer = np.tile(np.repeat(np.array(layers, dtype=np.int16), k), first.step.size)
    else:
        keys = []
        for la in layers:
            t = trace.layers[la]
            rows = np.repeat(t.step.astype(np.int64), t.experts.shape[1])
            keys.append((rows * L + la) * E + t.experts.ravel().astype(np.int64))
        key = np.unique(np.concatenate(keys))  # sorted by step, then layer, then expert
        step, pair = np.divmod(key, L * E)
        layer, expert = np.divmod(pair, E)
        step, layer, expert = (
            step.astype(np.int32),
            layer.astype(np.int16),
            expert.astype(np.uint16),
        )
    steps = int(step[-1]) + 1 if step.size else 0
    ptr = np.searchsorted(step, np.arange(steps + 1))
    pair = layer.astype(np.int32) * E + expert
    pair = pair.astype(np.uint16) if L * E <= 1 << 16 else pair
    order = np.argsort(pair, kind="stable")  # by pair, then step: the next use is the next entry
    del pair
    nxt = np.full(step.size, NEVER, dtype=np.float32)  # steps < 2**24 are exact
    same = np.flatnonzero(
        (layer[order[1:]] == layer[order[:-1]]) & (expert[order[1:]] == expert[order[:-1]])
    )
    nxt[order[same]] = step[order[same + 1]]
    del order, same
    tokens = first.experts.shape[0]
    if decode:
        rows = np.ones(steps, dtype=np.int64)
    else:
        rows = np.bincount(first.step.astype(np.int64), minlength=steps)[:steps]
    need = np.bincount(step.astype(np.int64) * L + layer, minlength=steps * L)
    need = need.reshape(steps, L).max(axis=1)
    return Demand(L, E, ptr, layer, expert, nxt, tokens, rows, layers, need)


@dataclass
class Result:
    policy: str
    scope: str
    slots: int  # in all layers
    hits: int
    misses: int
    hit_rate: float
    mb_per_token: float


def replay(
    d: Demand, policy: str, scope: str, slots: int, expert_bytes: int, decode_only: bool = False
) -> Result:
    """Replay ``d`` through ``policy`` with ``slots`` expert slots in all (``scope`` decides how
    they are split: equal per-layer banks, or one pool). ``decode_only``: count hits and misses
    of one-token steps only (as ``--timing``'s per decode token figures; every step still
    changes the banks)."""
    if policy not in POLICIES or scope not in SCOPES:
        raise ValueError(f"unknown policy/scope {policy}/{scope}")
    L, E = d.num_layers, d.num_experts
    n_layers = len(d.layers)
    per_layer = slots // n_layers
    resident = np.zeros((L, E), dtype=bool)
    prio = np.zeros((L, E))  # the policy's value: evict the lowest
    key = np.full((L, E), NEVER)  # eviction order: prio + recency tie-break; NEVER if absent
    count = np.zeros((L, E))
    clock = np.zeros(L if scope == "layer" else 1)
    occupancy = np.zeros(L, dtype=np.int64)
    capacity = np.zeros(L, dtype=np.int64)
    capacity[d.layers] = per_layer
    pinned = _pinned(d, slots, scope) if policy == "pin" else None
    tie = 1e-3 / (d.steps + 1)
    hits = misses = 0
    counted = d.rows == 1 if decode_only else np.ones(d.steps, dtype=bool)
    for s in range(d.steps):
        before = (hits, misses)
        a, b = d.ptr[s], d.ptr[s + 1]
        lay, exp = d.layer[a:b].astype(np.intp), d.expert[a:b].astype(np.intp)
        nxt = d.next_use[a:b]
        if d.step_need[s] > per_layer or (scope == "global" and b - a > slots):
            # a step that cannot fit (a long prefill chunk): its resident experts are hits,
            # the rest misses, and it leaves those banks as they were (the runtime would split it)
            big = np.bincount(lay, minlength=L) > capacity if scope == "layer" else np.ones(L, bool)
            sel = big[lay]
            h = int(resident[lay[sel], exp[sel]].sum())
            hits += h
            misses += int(sel.sum()) - h
            lay, exp, nxt = lay[~sel], exp[~sel], nxt[~sel]
        hit = resident[lay, exp]
        h = int(hit.sum())
        hits += h
        key[lay, exp] = NEVER  # the step's experts are never victims
        if h < hit.size:
            miss_l, miss_e = lay[~hit], exp[~hit]
            misses += miss_l.size
            if scope == "layer":
                need = np.bincount(miss_l, minlength=L)
                evicted = _evict_per_layer(key, occupancy + need - capacity)
            else:
                evicted = _evict_global(key, occupancy.sum() + miss_l.size - slots)
            if evicted is not None:
                el, ee = evicted
                resident[el, ee] = False
                key[el, ee] = NEVER
                np.subtract.at(occupancy, el, 1)
                if policy == "lfuda":  # the clock moves to the priority of the last victim
                    if scope == "layer":
                        np.maximum.at(clock, el, prio[el, ee])
                    else:
                        clock[0] = max(clock[0], prio[el, ee].max())
                count[el, ee] = 0
            resident[miss_l, miss_e] = True
            np.add.at(occupancy, miss_l, 1)
        if policy in ("lru", "pin"):
            prio[lay, exp] = s
        elif policy == "lfu":
            count[lay, exp] += 1
            prio[lay, exp] = count[lay, exp]
        elif policy == "lfuda":
            count[lay, exp] += 1
            prio[lay, exp] = count[lay, exp] + (clock[lay] if scope == "layer" else clock[0])
        else:  # belady: the farthest next use is evicted first
            prio[lay, exp] = -nxt
        key[lay, exp] = prio[lay, exp] + s * tie
        if pinned is not None:  # evicted only when nothing else can be (as PinnedLRUPolicy)
            key[lay, exp] = np.where(pinned[lay, exp], PINNED, key[lay, exp])
        if policy == "lfu" and (s + 1) % AGE_STEPS == 0:
            recency = key[resident] - prio[resident]
            count *= 0.5
            prio[resident] = count[resident]
            key[resident] = prio[resident] + recency
        if not counted[s]:
            hits, misses = before
    total = hits + misses
    tokens = int(counted.sum()) if decode_only else d.tokens
    return Result(
        policy,
        scope,
        slots,
        hits,
        misses,
        hits / total if total else 0.0,
        misses * expert_bytes / max(tokens, 1) / 1e6,
    )


def _evict_per_layer(key: np.ndarray, over: np.ndarray):
    """Per layer, the ``over[layer]`` entries of lowest ``key`` (NEVER: not evictable)."""
    rows = np.flatnonzero(over > 0)
    if rows.size == 0:
        return None
    counts = over[rows]
    p = key[rows]
    m = int(counts.max())
    cand = np.argpartition(p, m - 1, axis=1)[:, :m]
    if m > 1:
        cand = np.take_along_axis(cand, np.argsort(np.take_along_axis(p, cand, 1), axis=1), 1)
    take = np.arange(m)[None, :] < counts[:, None]
    ee = cand[take]
    if (p[np.repeat(np.arange(rows.size), counts), ee] == NEVER).any():
        raise ValueError("a step needs more experts than its layer's bank has slots")
    return np.repeat(rows, counts), ee


def _evict_global(key: np.ndarray, over: int):
    if over <= 0:
        return None
    p = key.ravel()
    flat = np.argpartition(p, over - 1)[:over]
    if (p[flat] == NEVER).any():
        raise ValueError("a step needs more experts than the budget has slots")
    return np.divmod(flat, key.shape[1])


def _pinned(d: Demand, slots: int, scope: str) -> np.ndarray:
    """The most used experts (per layer, or over all layers) in PIN_FRACTION of the slots."""
    freq = np.zeros((d.num_layers, d.num_experts))
    np.add.at(freq, (d.layer, d.expert), 1)
    pinned = np.zeros(freq.shape, dtype=bool)
    if scope == "layer":
        per_layer = slots // len(d.layers)
        n = min(int(per_layer * PIN_FRACTION), per_layer - int(np.median(d.step_need)))
        if n > 0:
            top = np.argsort(-freq, axis=1)[:, :n]
            rows = np.array(d.layers)
            pinned[rows[:, None], top[rows]] = True
    else:
        n = min(int(slots * PIN_FRACTION), slots - int(np.median(d.step_need)) * len(d.layers))
        if n > 0:
            pinned.ravel()[np.argsort(-freq.ravel())[:n]] = True
    return pinned


def run_policies(
    traces: list[Path],
    budgets_gib: list[float] | None,
    slots: list[int] | None,
    expert_bytes: int | None,
    policies=POLICIES,
    scopes=SCOPES,
    out=None,
    decode_only: bool = False,
) -> list[dict]:
    out = out or sys.stdout
    rows = []
    for path in traces:
        trace = read_trace(path)
        eb = expert_bytes or trace.meta.get("expert_bytes")
        if not eb:
            raise ValueError(f"{path}: no expert_bytes in the trace; give --expert-mb")
        d = demand(trace)
        n = len(d.layers)
        sizes = [int(g * GiB // eb) for g in budgets_gib or []]
        sizes += [s * n for s in slots or []]
        print(
            f"{path}: {d.tokens} tokens, {d.steps} steps, {n} MoE layers, "
            f"{trace.num_experts} experts, top-{trace.top_k}, {eb / 1e6:.2f} MB per expert",
            file=out,
        )
        print(
            f"{'slots/layer':>11} {'GiB':>7} {'policy':>7} {'scope':>6} {'hit %':>6} "
            f"{'MB/token':>9} {'s':>5}",
            file=out,
        )
        for total in sizes:
            if total // n < trace.top_k:
                print(f"{total // n:>11}: fewer slots than top-k, skipped", file=out)
                continue
            for policy in policies:
                for scope in scopes:
                    t0 = time.perf_counter()
                    r = replay(d, policy, scope, total, eb, decode_only)
                    dt = time.perf_counter() - t0
                    row = {"trace": str(path), "gib": total * eb / GiB, "seconds": dt, **asdict(r)}
                    rows.append(row)
                    print(
                        f"{total // n:>11} {row['gib']:>7.2f} {policy:>7} {scope:>6} "
                        f"{100 * r.hit_rate:>6.1f} {r.mb_per_token:>9.1f} {dt:>5.1f}",
                        file=out,
                        flush=True,
                    )
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["trace"], r["policy"], r["scope"]) for r in rows}):
        pts = sorted(
            (r["gib"], r["mb_per_token"])
            for r in rows
            if (r["trace"], r["policy"], r["scope"]) == key
        )
        label = f"{Path(key[0]).stem}: {key[1]} ({key[2]})"
        ax.plot(
            *zip(*pts, strict=True),
            marker="o",
            label=label,
            linestyle="--" if key[2] == "global" else "-",
        )
    ax.set_xlabel("expert bank, GiB (all layers)")
    ax.set_ylabel("MB read per token")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def add_arguments(p) -> None:
    p.add_argument("traces", nargs="+", help="routing traces (--trace FILE of flashmoe-run)")
    p.add_argument("--budget", type=float, nargs="+", metavar="GiB", help="expert bank sizes")
    p.add_argument("--slots", type=int, nargs="+", help="or: slots per MoE layer")
    p.add_argument("--expert-mb", type=float, help="bytes per expert (default: the trace's)")
    p.add_argument("--policy", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--scope", nargs="+", choices=SCOPES, default=list(SCOPES))
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="count one-token steps only (compare with flashmoe-run --timing's per decode token)",
    )
    p.add_argument(
        "--design",
        metavar="PRESET",
        help="first write each TRACE from the realistic routing design of PRESET "
        "(flashmoe-bench synth's, no model run): --design-layers, --design-tokens",
    )
    p.add_argument("--design-layers", type=int, default=60)
    p.add_argument("--design-tokens", type=int, default=20000)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a plot (PNG, needs matplotlib)")


def run(args) -> int:
    from .report import BenchError

    if not args.budget and not args.slots:
        raise BenchError("give --budget GiB... or --slots N...")
    try:
        if args.design:
            from .routing import PROFILES, design_trace

            if args.design not in PROFILES:
                raise ValueError(f"unknown preset {args.design!r}")
            for seed, path in enumerate(args.traces):
                design_trace(path, args.design, args.design_layers, args.design_tokens, seed=seed)
        rows = run_policies(
            [Path(t) for t in args.traces],
            args.budget,
            args.slots,
            int(args.expert_mb * 1e6) if args.expert_mb else None,
            args.policy,
            args.scope,
            decode_only=args.decode_only,
        )
    except (OSError, ValueError) as e:
        raise BenchError(str(e)) from None
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.plot and not plot(rows, Path(args.plot)):
        print("plot: matplotlib is not installed (pip install 'flashmoe[bench]')")
    return 0
