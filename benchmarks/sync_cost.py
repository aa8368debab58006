"""Where a partial bank's decode time goes, on one host: stock mlx-lm, a bank of every expert (no
router sync), a bank of all but one expert filled before the clock (a router sync per MoE layer,
next to no misses), and a bank of ``--bank`` slots (syncs and misses; not emptied between rounds,
so later rounds show its steady state). Rows alternate, so the host's drift hits all alike.
The store counters (hit rate, sync / host / I/O ms per token) include the prefill's::

    python benchmarks/sync_cost.py SOURCE LAYOUT --rounds 4 --bank 128
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
p.add_argument("--rounds", type=int, default=4)
p.add_argument("--bank", type=int, default=128, help="slots of the partial bank")
p.add_argument("--tokens", type=int, default=128)
args = p.parse_args()

n = json.loads((Path(args.layout) / "flashmoe-index.json").read_text())["num_experts"]
stock, _ = lm_load(args.source)
prompt = mx.random.randint(0, 1000, (16,), key=mx.random.key(0)).tolist()
_, _, ref = _decode(stock, prompt, args.tokens)
models = {"stock": stock}
models["full"], _ = load(args.layout, bank_experts=n)  # filled at load
near, _ = load(args.layout, bank_experts=n - 1)
for layer in near.flashmoe.store.banks:
    near.flashmoe.store.ensure(layer, list(range(n - 1)))
models[f"{n - 1} filled"] = near
models[str(args.bank)], _ = load(args.layout, bank_experts=args.bank)
for name, m in models.items():  # compiles each model's kernels off the clock
    _, _, ids = _decode(m, prompt, args.tokens)
    print(name, "identical", ids == ref, flush=True)
rates = {k: [] for k in models}
for _ in range(args.rounds):
    for name, m in models.items():
        rt = getattr(m, "flashmoe", None)
        if rt is not None:
            rt.store.stats.reset()
        _, rate, _ = _decode(m, prompt, args.tokens)
        rates[name].append(rate)
        extra = ""
        if rt is not None:
            st, per = rt.store.stats, 1e3 / args.tokens
            extra = (f" hit {100 * st.hit_rate:.1f}% sync {per * st.sync_seconds:.2f} ms/tok "
                     f"host {per * st.host_seconds:.2f} io {per * st.io_seconds:.2f}")  # fmt: skip
        print(f"{name}: {rate:.1f} tok/s{extra}", flush=True)
for name, r in rates.items():
    ratio = [a / b for a, b in zip(r, rates["stock"], strict=True)]
    print(f"{name}: median {statistics.median(r):.1f} tok/s, x stock per round "
          f"{', '.join(f'{x:.2f}' for x in ratio)}")  # fmt: skip
