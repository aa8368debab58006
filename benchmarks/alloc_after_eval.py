"""What a small numpy allocation costs inside a partial bank's decode step, and why.

    python benchmarks/alloc_after_eval.py                 # tiny 8-layer model, this machine
    python benchmarks/alloc_after_eval.py --layout L      # any layout (e.g. the H200's q4.layout)

The bank's device table (``ExpertBank.device_table``: ``np.maximum`` of a 512-entry int64 table,
``astype``, ``mx.array``) costs ~3 us in isolation but took 85-87 us per call inside decode, on this
machine's CPU and on the H200. This script times, at that point of every decode layer (right after
the router's ``mx.async_eval``), a 4 KB ``np.empty`` first and then the table itself, in child
processes under each ``GLIBC_TUNABLES`` setting of ``--tunables``, and prints a table (JSON with
``--json``). If the 4 KB allocation carries the cost and ``glibc.malloc.mxfast=0`` (no fastbins)
removes it, the cost is glibc's ``malloc_consolidate``: a request of >= 1 KB first merges every
small chunk freed into the fastbins since the last one (MLX frees a graph's worth of small nodes
per step), and whichever allocation comes first pays for all of them; tok/s then tells whether
the cost moved elsewhere or went away.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TUNABLES = ["", "glibc.malloc.mxfast=0"]


def build_tiny(root: Path) -> Path:
    """An 8-layer model with the 397B's routing geometry (512 experts, top-10) and tiny matrices,
    so that a decode step is bound by per-operation host costs, not by matmuls."""
    from flashmoe.bench.synth import preset_config, synthesize
    from flashmoe.convert import convert_checkpoint

    layout = root / "layout"
    if not layout.exists():
        config = preset_config("qwen3.5-397b", 8, vocab=512)
        config["text_config"].update(
            hidden_size=128,
            moe_intermediate_size=64,
            shared_expert_intermediate_size=64,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=64,
            linear_num_key_heads=1,
            linear_num_value_heads=2,
            linear_key_head_dim=64,
            linear_value_head_dim=64,
        )
        synthesize(root / "ckpt", "qwen3.5-397b", 8, vocab=512, config=config, dtype="float32",
                   progress=False)  # fmt: skip
        convert_checkpoint(root / "ckpt", layout, progress=False)
    return layout


def measure(layout: str, bank: int, tokens: int) -> dict:
    """One decode run with the device table's parts timed (this process)."""
    import mlx.core as mx
    import numpy as np
    from flashmoe.bench.gpu_bench import _decode, _set_eager
    from flashmoe.metal.bank import ExpertBank
    from flashmoe.runtime import load

    spent = {"alloc_4k": 0.0, "table": 0.0, "calls": 0}

    def device_table(self):
        if self._device_table is None:
            t0 = time.perf_counter()
            np.empty(512, dtype=np.int64)  # 4 KB: a "large" request to glibc (>= 1 KB)
            t1 = time.perf_counter()
            self._device_table = mx.array(np.maximum(self.table, 0).astype(np.uint32))
            t2 = time.perf_counter()
            spent["alloc_4k"] += t1 - t0
            spent["table"] += t2 - t1
            spent["calls"] += 1
        return self._device_table

    ExpertBank.device_table = device_table
    model, _ = load(layout, bank_experts=bank, cache_io_split=4, prefetch="off")
    store = model.flashmoe.store
    _set_eager(store, "presync")  # the table is built right after the router's async_eval
    prompt = list(range(1, 17))
    _decode(model, prompt, 16, decode="spread")  # warm-up
    store.clear_banks()
    spent.update(alloc_4k=0.0, table=0.0, calls=0)
    _, rate, _ = _decode(model, prompt, tokens + 1, decode="spread")
    calls = max(spent["calls"], 1)
    return {
        "tok_s": rate,
        "calls": spent["calls"],
        "alloc_4k_us": 1e6 * spent["alloc_4k"] / calls,
        "table_us": 1e6 * spent["table"] / calls,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", help="layout directory (default: a tiny synthetic one, built once)")
    p.add_argument("--dir", type=Path, default=Path("benchmarks/out/alloc-after-eval"))
    p.add_argument("--bank", type=int, default=128)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2, help="passes over the tunables (alternating)")
    p.add_argument("--tunables", default=",".join(t or "none" for t in TUNABLES),
                   help="GLIBC_TUNABLES values, comma-separated, 'none' for none")  # fmt: skip
    p.add_argument("--json", type=Path)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.layout, args.bank, args.tokens)))
        return 0
    layout = args.layout or str(build_tiny(args.dir))
    rows = []
    for _ in range(args.rounds):
        for tunable in args.tunables.split(","):
            env = dict(os.environ)
            env.pop("GLIBC_TUNABLES", None)
            if tunable != "none":
                env["GLIBC_TUNABLES"] = tunable
            cmd = [sys.executable, __file__, "--child", "--layout", layout, "--bank",
                   str(args.bank), "--tokens", str(args.tokens)]  # fmt: skip
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            row = {"tunables": tunable, **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{tunable:>24}  {row['tok_s']:6.1f} tok/s  4 KB np.empty {row['alloc_4k_us']:6.1f}"
                  f" us  then the table {row['table_us']:5.1f} us  ({row['calls']} calls)",
                  flush=True)  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"layout": layout, "bank": args.bank, "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
