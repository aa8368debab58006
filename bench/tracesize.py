"""Routing-trace size against its entropy, and the writer's cost per call (RESULTS.md, "Routing
traces"): ``python -m flashmoe.bench.tracesize --kind design|locality|uniform``.

``design``: the realistic 397B design (``routing.design_routes``); ``locality``: uniform popularity,
each id of a layer's previous token kept with probability ``--keep`` (~30 % shared); ``uniform``:
top-k of uniform noise. The bounds are per layer and token, in bits, estimated from the routes:
``marginal`` = the sum of the per-expert inclusion entropies; ``count`` = experts in popularity
order, each bit given how many of the k were already placed (the exactly-k constraint);
``previous`` = as ``count`` and also given the bit in the previous token's set (locality).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def sticky_routes(
    rng: np.random.Generator, tokens: int, experts: int, k: int, keep: float, layers: int
) -> list[np.ndarray]:
    """Per layer ``tokens x k`` ids: each id of the previous token's set stays with probability
    ``keep``, the others are drawn uniformly (``keep`` 0: uniform routing)."""
    out = np.empty((layers, tokens, k), np.uint16)
    prev = None
    for t in range(tokens):
        score = rng.random((layers, experts))
        if prev is not None and keep:
            kept = np.where(rng.random((layers, k)) < keep, 2.0, -1.0)
            np.put_along_axis(score, prev, np.maximum(kept, np.take_along_axis(score, prev, 1)), 1)
        prev = np.argpartition(-score, k - 1, axis=1)[:, :k]
        out[:, t] = prev
    return list(out)


def entropy_bounds(routes: np.ndarray, experts: int) -> tuple[float, float, float]:
    """(marginal, count, previous) bits per token of one layer's ``tokens x k`` routes."""
    tokens, k = routes.shape
    bits = np.zeros((tokens, experts), bool)
    bits[np.arange(tokens)[:, None], routes] = True
    p = bits.mean(0)
    bits = bits[:, np.argsort(-p, kind="stable")]
    placed = np.cumsum(bits, axis=1) - bits
    prev = np.vstack([np.zeros((1, experts), bool), bits[:-1]])
    rank = np.arange(experts)

    def cond(context: np.ndarray, size: int) -> float:
        n = np.bincount((context * 2 + bits).ravel(), minlength=2 * size).reshape(-1, 2)
        tot = n.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(-np.where(n > 0, n * np.log2(n / tot), 0).sum() / tokens)

    q = np.clip(p, 1e-12, 1 - 1e-12)
    marginal = float(-(q * np.log2(q) + (1 - q) * np.log2(1 - q)).sum())
    count = cond(rank * (k + 1) + placed, experts * (k + 1))
    previous = cond((rank * (k + 1) + placed) * 2 + prev, experts * (k + 1) * 2)
    return marginal, count, previous


def write(
    path: Path, routes: list[np.ndarray], experts: int, meta: dict, pace: float = 0.0
) -> tuple[list[float], list[float]]:
    """Record ``routes`` one token and layer per call, with a hit mask made as the runtime makes
    it (``bank.table[experts] >= 0``; an empty bank: all misses, as ``design_trace`` records):
    the seconds of each call, and of each token (its calls, then ``pace`` seconds of sleep: a
    stand-in for the decode step, which leaves the GIL to the writer thread as MLX does)."""
    from ..runtime.trace import TraceWriter

    layers, (tokens, k) = len(routes), routes[0].shape
    table = np.full(experts, -1, np.int32)
    times, per_token = [], []
    with TraceWriter(path, num_layers=layers, num_experts=experts, top_k=k, meta=meta) as w:
        for t in range(tokens):
            start = time.perf_counter()
            for layer in range(layers):
                ids = routes[layer][t : t + 1]
                t0 = time.perf_counter()
                w.record(layer, ids, table[ids] >= 0)
                times.append(time.perf_counter() - t0)
            if pace:
                time.sleep(pace)
            per_token.append(time.perf_counter() - start)
    return times, per_token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("design", "locality", "uniform"), default="design")
    p.add_argument("--preset", default="qwen3.5-397b")
    p.add_argument("--layers", type=int, default=60)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--keep", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=Path("tracesize.fmt"))
    p.add_argument(
        "--pace-ms", type=float, default=0.0, help="sleep after each token (a decode step)"
    )
    args = p.parse_args(argv)
    from ..runtime.trace import read_trace

    if args.kind == "design":
        from .routing import design_routes

        routes, meta, experts, _ = design_routes(args.preset, args.layers, args.tokens)
    else:
        experts, k = 512, 10
        keep = args.keep if args.kind == "locality" else 0.0
        routes = sticky_routes(np.random.default_rng(5), args.tokens, experts, k, keep, args.layers)
        meta = {"kind": args.kind, "keep": keep}
    times, per_token = map(np.array, write(args.out, routes, experts, meta, args.pace_ms / 1e3))
    t0 = time.perf_counter()
    read_trace(args.out)
    read = time.perf_counter() - t0
    size = args.out.stat().st_size
    bounds = np.mean([entropy_bounds(r, experts) for r in routes], axis=0)
    calls = args.layers * args.tokens
    print(
        f"{args.kind}: {args.tokens} tokens x {args.layers} layers: {size / 1e6:.1f} MB, "
        f"{size / calls:.2f} B per token and layer ({8 * size / calls:.1f} bits)"
    )
    print(
        "entropy per token and layer (bits): marginal {:.1f}, count {:.1f}, previous {:.1f}"
        " = {:.1f} MB".format(*bounds, bounds.min() / 8 * calls / 1e6)
    )
    print(
        f"record(): {times.mean() * 1e6:.1f} us per call on average (median "
        f"{np.median(times) * 1e6:.1f} us, slowest {times.max() * 1e3:.1f} ms); "
        f"read_trace {read:.1f} s"
    )
    print(
        f"per token (its {args.layers} calls + {args.pace_ms:g} ms paced): median "
        f"{np.median(per_token) * 1e3:.2f} ms, slowest {per_token.max() * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
