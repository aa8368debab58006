"""A bank of every expert vs stock mlx-lm, alternating greedy decode runs in one process (both
models resident, same random 16-token prompt), so that the GPU host's drift hits both alike::

    python benchmarks/fullbank_ab.py SOURCE LAYOUT --pairs 5 --tokens 128
"""

import argparse
import json
import statistics
from pathlib import Path

import mlx.core as mx
from flashmoe.bench.gpu_bench import _decode
from flashmoe.runtime import load
from mlx_lm import load as lm_load

p = argparse.ArgumentParser()
p.add_argument("source", help="the source checkpoint (stock mlx-lm loads it)")
p.add_argument("layout", help="its flashmoe layout")
p.add_argument("--pairs", type=int, default=5)
p.add_argument("--tokens", type=int, default=128)
args = p.parse_args()

stock, _ = lm_load(args.source)
prompt = mx.random.randint(0, 1000, (16,), key=mx.random.key(0)).tolist()
_decode(stock, prompt, 8)  # warm-up: kernels compile off the clock
experts = json.loads((Path(args.layout) / "flashmoe-index.json").read_text())["num_experts"]
model, _ = load(args.layout, bank_experts=experts)  # filled: every expert read at load
_decode(model, prompt, 8)
rates = {"stock": [], "flashmoe": []}
for _ in range(args.pairs):
    for name, m in (("stock", stock), ("flashmoe", model)):
        _, rate, _ = _decode(m, prompt, args.tokens)
        rates[name].append(round(rate, 1))
        print(name, round(rate, 1), flush=True)
ratios = [f / s for f, s in zip(rates["flashmoe"], rates["stock"], strict=True)]
print(rates)
print(f"flashmoe / stock per pair: {', '.join(f'{r:.3f}' for r in ratios)}; "
      f"median {statistics.median(ratios):.3f}")  # fmt: skip
