"""Eager vs lazy evaluation of each decode step's experts, alternating runs in one process (same
model, same bank, emptied before every run; pair order alternates), so that drift and neighbours'
load hit both sides alike::

    python benchmarks/eager_ab.py LAYOUT --bank 16 --pairs 10
"""

import argparse
import statistics
import time

import mlx.core as mx
from flashmoe.runtime import load
from mlx_lm.generate import generate_step

p = argparse.ArgumentParser()
p.add_argument("layout")
p.add_argument("--bank", type=int, required=True)
p.add_argument("--pairs", type=int, default=10)
p.add_argument("--tokens", type=int, default=24)
p.add_argument("--io-threads", type=int, default=2)
args = p.parse_args()

model, _ = load(args.layout, bank_experts=args.bank, io_threads=args.io_threads)
store = model.flashmoe.store
prompt = mx.array([1, 2, 3, 4, 5, 6, 7, 8])


def decode_rate(tokens: int) -> float:
    """Decode tok/s after the first token, from an empty bank."""
    store.clear_banks()
    start, count = None, 0
    for i, _ in enumerate(generate_step(prompt, model, max_tokens=tokens)):
        if i == 0:
            start = time.perf_counter()
        count += 1
    return (count - 1) / (time.perf_counter() - start)


decode_rate(8)  # warm-up
rates: dict[bool, list[float]] = {True: [], False: []}
for i in range(args.pairs):
    for eager in (True, False) if i % 2 else (False, True):
        store.eager = eager
        rates[eager].append(decode_rate(args.tokens))
ratios = [a / b for a, b in zip(rates[True], rates[False], strict=True)]
print(
    f"bank {args.bank}: eager median {statistics.median(rates[True]):.1f} tok/s, lazy "
    f"{statistics.median(rates[False]):.1f}; eager/lazy per pair: median "
    f"{statistics.median(ratios):.3f}, eager faster in {sum(r > 1 for r in ratios)}/{args.pairs}"
)
