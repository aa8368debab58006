"""``flashmoe-bench runtime LAYOUT``: the runtime issue's benchmark, in one run.

Warm page cache, one fresh process per measurement, greedy decode of ``--tokens`` tokens:

1. stock mlx-lm on the source checkpoint (one warm-up generation, then measured);
2. flashmoe with the bank holding every expert (same warm-up: the measured run is all hits);
3. flashmoe with a memory budget sized for a bank of 25 % of the experts (no warm-up): tok/s,
   hit rate, MB read and expert I/O ms per token, peak RSS against the budget.

(1) and (2) alternate ``--repeat`` times; the ratio is of the medians (target >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from . import pagecache
from .machine import block_device, describe, summary
from .measure import run_worker
from .report import (
    DEFAULT_PROMPT,
    BenchError,
    command_line,
    open_layout,
    output_path,
    source_of,
    table,
    write_json,
)
from .sweep import row_of

GiB = 1 << 30
COLUMNS = [
    "engine",
    "bank",
    "tok/s (median)",
    "runs tok/s",
    "hit rate",
    "MB read/token",
    "expert I/O ms/token",
    "TTFT ms",
    "peak RSS MB",
    "budget MB",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("layout", help="flashmoe layout directory")
    p.add_argument("--source", help="source checkpoint (default: the index's source path)")
    p.add_argument("--tokens", type=int, default=128, help="decode tokens (default 128)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--repeat", type=int, default=3, help="alternating mlx-lm/full-bank runs")
    p.add_argument("--fraction", type=float, default=0.25, help="bank fraction (default 0.25)")
    p.add_argument("--cache-io-split", type=int, default=1)
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--reader", choices=("auto", "native", "python"), default="auto")
    p.add_argument("--json", help="output JSON (default flashmoe-bench-out/runtime-<time>.json)")
    p.add_argument("--timeout", type=float, default=3600)


def budget_for(index, fraction: float, max_kv_tokens: int = 8192) -> tuple[int, int]:
    """(budget bytes, slots) such that ``load(memory_budget_gb=...)`` picks ``fraction`` of experts."""
    from ..layouts import text_config
    from ..runtime.sizing import kv_cache_bytes

    slots = max(index.top_k, round(index.num_experts * fraction))
    kv = kv_cache_bytes(text_config(index.config), max_kv_tokens)
    budget = index.dense.size + kv + (256 << 20) + slots * len(index.layers) * index.expert_bytes
    return budget, slots


def run(args) -> int:
    index, root = open_layout(args.layout)
    source = source_of(index, args.source)
    if source is None:
        raise BenchError("no source checkpoint: pass --source CHECKPOINT")
    if args.repeat < 1:
        raise BenchError("--repeat must be >= 1")
    layout_files, source_files = pagecache.files_of(root), pagecache.files_of(source)
    base = {"prompt": args.prompt, "max_tokens": args.tokens, "block_device": block_device(root)}
    opts = {"cache_io_split": args.cache_io_split, "io_threads": args.io_threads}
    opts["reader"] = args.reader

    def measure(engine: str, path, files, warmup: int, **extra) -> dict:
        pagecache.warm(files)
        spec = dict(base, engine=engine, path=str(path), warmup=warmup)
        spec["options"] = dict(opts, **extra) if engine == "flashmoe" else {}
        r = run_worker(spec, timeout=args.timeout)
        if "error" in r:
            raise BenchError(f"{engine} measurement failed: {r['error']}")
        print(f"  {engine} {extra or ''}: {r['decode_tps']:.2f} tok/s", file=sys.stderr)
        return r

    ref_runs, full_runs = [], []
    for _ in range(args.repeat):
        ref_runs.append(measure("mlx-lm", source, source_files, 1))
        full_runs.append(measure("flashmoe", root, layout_files, 1, bank_experts=index.num_experts))
    budget, want = budget_for(index, args.fraction)
    part = measure("flashmoe", root, layout_files, 0, memory_budget_gb=budget / GiB)

    ref_tps = statistics.median(r["decode_tps"] for r in ref_runs)
    full_tps = statistics.median(r["decode_tps"] for r in full_runs)
    same = all(r["tokens"] == ref_runs[0]["tokens"] for r in ref_runs + full_runs + [part])
    full_row = row_of(full_runs[0])
    part_row = row_of(part)

    def runs(rs):
        return ", ".join(f"{r['decode_tps']:.2f}" for r in rs)

    rows = [
        ["mlx-lm (source)", "-", ref_tps, runs(ref_runs), None, None, None,
         ref_runs[0]["ttft_s"] * 1000, max(r["max_rss"] for r in ref_runs) / 1e6, None],
        ["flashmoe", f"{index.num_experts} (100%)", full_tps, runs(full_runs),
         f"{full_row['hit_rate'] * 100:.1f}%", full_row["mb_read_per_token"],
         full_row["expert_io_ms_per_token"], full_row["ttft_ms"],
         max(r["max_rss"] for r in full_runs) / 1e6, None],
        ["flashmoe", f"{part['bank_experts']} ({part['bank_experts'] / index.num_experts:.0%})",
         part["decode_tps"], runs([part]), f"{part_row['hit_rate'] * 100:.1f}%",
         part_row["mb_read_per_token"], part_row["expert_io_ms_per_token"], part_row["ttft_ms"],
         part_row["peak_rss_mb"], budget / 1e6],
    ]  # fmt: skip
    machine = describe(root)
    result = {
        "command": command_line(),
        "machine": machine,
        "layout": str(root),
        "source": str(source),
        "tokens": args.tokens,
        "ratio_full_bank_vs_mlx_lm": full_tps / ref_tps,
        "target": 0.95,
        "tokens_identical": same,
        "budget_bytes": budget,
        "budget_slots_expected": want,
        "budget_slots_chosen": part["bank_experts"],
        "peak_rss_bytes_vs_budget": part["max_rss"] / budget,
        "columns": COLUMNS,
        "rows": rows,
        "mlx_lm": ref_runs,
        "flashmoe_full": full_runs,
        "flashmoe_partial": part,
    }
    out = output_path(args.json, "runtime")
    write_json(out, result)
    print(f"machine: {summary(machine)}")
    print(
        f"layout: {root}; {len(index.layers)} MoE layers x {index.num_experts} experts of "
        f"{index.expert_bytes / 1e6:.2f} MB, top-{index.top_k}; warm page cache; "
        f"{args.tokens} decode tokens\n"
    )
    print(table(COLUMNS, rows))
    print(
        f"\nfull bank / mlx-lm decode tok/s: {full_tps / ref_tps:.3f} (target >= 0.95)\n"
        f"{part['budget_note']}\n"
        f"peak RSS {part['max_rss'] / 1e6:.0f} MB vs budget {budget / 1e6:.0f} MB "
        f"({part['max_rss'] / budget:.2f}x)\n"
        f"tokens identical to stock mlx-lm in every run: {same}\nJSON: {out}"
    )
    return 0
