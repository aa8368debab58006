"""Where a partial bank's decode token spends its host time: cProfile over spread decode steps.

    python benchmarks/host_profile.py                       # small 8-layer model, CPU, built once
    python benchmarks/host_profile.py --layout q4.layout    # any layout (e.g. on the H200)

Loads the layout with ``--bank`` slots per layer, runs one unprofiled warm-up decode (kernels,
bank filled by the prompt), empties the bank, then profiles ``--tokens`` spread-decode steps
(``flashmoe-bench gpu``'s ``--decode spread``: the routing varies as over real text). Prints the
store's per-token counters and the functions with the most own time (``--top``), and writes the
raw profile to ``--out`` (``python -m pstats`` reads it).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

from flashmoe.bench.gpu_bench import _decode, _set_eager
from flashmoe.runtime import load

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--layout", type=Path, help="layout directory (default: a small synthetic one)")
p.add_argument("--dir", type=Path, default=Path("benchmarks/out/host-profile"))
p.add_argument("--bank", type=int, default=128, help="bank slots per layer")
p.add_argument("--tokens", type=int, default=64, help="profiled decode tokens")
p.add_argument("--prefetch", default="on", help="off, on or auto")
p.add_argument("--eager", default="presync", help="flashmoe-bench gpu's --eager modes")
p.add_argument("--io-threads", type=int, default=None)
p.add_argument("--top", type=int, default=40)
p.add_argument("--sort", default="tottime", help="pstats sort key (tottime, cumulative)")
p.add_argument("--out", type=Path, default=Path("benchmarks/out/host-profile.prof"))
args = p.parse_args()

layout = args.layout
if layout is None:
    from flashmoe.bench.synth import small_config, synthesize
    from flashmoe.convert import convert_checkpoint

    ckpt, layout = args.dir / "ckpt-8L", args.dir / "layout-8L"
    if not layout.exists():
        config = small_config("qwen3.5-397b", 8, 2048, expert_intermediate=64)
        synthesize(ckpt, "qwen3.5-397b", 8, config=config, dtype="float32", progress=False)
        convert_checkpoint(ckpt, layout, progress=False)

model, _ = load(
    str(layout),
    bank_experts=args.bank,
    cache_io_split=4,
    prefetch=args.prefetch,
    io_threads=args.io_threads,
)
store = model.flashmoe.store
_set_eager(store, args.eager)
prompt = list(range(1, 17))
_decode(model, prompt, 16, decode="spread")  # warm-up: kernels compiled, caches touched
store.clear_banks()


def reset():
    store.stats.reset()


profile = cProfile.Profile()
profile.enable()
first, rate, ids = _decode(model, prompt, args.tokens + 1, on_first=reset, decode="spread")
profile.disable()
s = store.stats
n = max(len(ids) - 1, 1)
print(
    f"{rate:.1f} tok/s (profiled), hit {100 * s.hit_rate:.1f} %, MB/token "
    f"{s.bytes_read / n / 1e6:.1f}, exposed I/O {1e3 * s.io_seconds / n:.2f} ms, sync "
    f"{1e3 * s.sync_seconds / n:.2f} ms, host {1e3 * s.host_seconds / n:.2f} ms per token",
    file=sys.stderr,
)
args.out.parent.mkdir(parents=True, exist_ok=True)
profile.dump_stats(str(args.out))
stats = pstats.Stats(profile, stream=sys.stdout)
stats.sort_stats(args.sort).print_stats(args.top)
