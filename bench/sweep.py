"""``flashmoe-bench sweep LAYOUT``: decode speed and expert I/O across cache-io-split (and more).

Each measurement runs in a fresh process (``bench.worker``): greedy decode of ``--tokens`` tokens
after a fixed prompt. Before each run the layout's page cache is dropped (``cold``, checked with
mincore) or warmed (``warm``, residency checked). ``--memory-cap GB`` runs every measurement in a
child memory cgroup (cold only: pages cached by another group are not charged to the capped one)
and reports disk MB read per token. Stock mlx-lm runs on the source checkpoint in the same run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

from . import pagecache
from .cgroup import CgroupError, check_available
from .machine import block_device, describe, summary
from .measure import run_worker
from .report import (
    DEFAULT_PROMPT,
    BenchError,
    command_line,
    int_list,
    layout_files_bytes,
    open_layout,
    output_path,
    source_of,
    table,
    write_json,
)

GiB = 1 << 30
COLUMNS = [
    "mode",
    "cache-io-split",
    "io-threads",
    "bank",
    "k",
    "tok/s",
    "expert I/O ms/token",
    "hit rate",
    "MB read/token",
    "disk MB/token (proc)",
    "disk MB/token (device)",
    "TTFT ms",
    "prompt tok/s",
    "peak RSS MB",
]
MLX_COLUMNS = ["engine", "mode", "tok/s", "TTFT ms", "prompt tok/s", "peak RSS MB", "note"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("layout", help="flashmoe layout directory")
    p.add_argument("--source", help="source checkpoint for stock mlx-lm (default: the index's)")
    p.add_argument("--splits", type=int_list, default=list(range(1, 9)), help="e.g. 1-8 or 1,4")
    p.add_argument("--io-threads", type=int_list, default=[8], help="list, e.g. 4,8")
    p.add_argument(
        "--bank-experts", type=int_list, default=None, help="list (default: 25%% of the experts)"
    )
    p.add_argument("--k", type=int_list, default=None, help="routed experts per token (list)")
    p.add_argument("--reader", choices=("auto", "native", "python"), default="auto")
    p.add_argument("--tokens", type=int, default=128, help="decode tokens (default 128)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--cold", action="store_true", help="drop the layout's page cache first")
    mode.add_argument("--warm", action="store_true", help="warm the page cache first (default)")
    mode.add_argument("--both", action="store_true", help="cold and warm")
    p.add_argument(
        "--memory-cap",
        type=float,
        metavar="GB",
        help="run each measurement in a memory cgroup of GB GiB (implies --cold)",
    )
    p.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="flashmoe memory budget (default under --memory-cap: the cap minus 0.1 GiB)",
    )
    p.add_argument("--no-mlx-lm", action="store_true", help="skip stock mlx-lm")
    p.add_argument("--llama-bench", metavar="PATH", help="llama-bench binary (with --gguf)")
    p.add_argument("--gguf", metavar="PATH", help="GGUF of the same model for --llama-bench")
    p.add_argument("--json", help="output JSON (default flashmoe-bench-out/sweep-<time>.json)")
    p.add_argument("--plot", help="PNG plot path (default: next to the JSON; needs matplotlib)")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per measurement")


def _prepare(files: list[Path], mode: str) -> float:
    """Drop or warm ``files``; return the resident fraction right before the run."""
    if mode == "cold":
        left = pagecache.drop(files)
        if left > 0.02:
            print(
                f"flashmoe-bench: warning: {left * 100:.1f}% of the files stay cached after "
                "POSIX_FADV_DONTNEED (mapped by another process?)",
                file=sys.stderr,
            )
        return left
    got = pagecache.warm(files)
    if got < 0.98:
        print(
            f"flashmoe-bench: warning: only {got * 100:.1f}% of the files are cached after "
            "warming (not enough free memory?)",
            file=sys.stderr,
        )
    return got


def _per_token(value, tokens: int, scale: float = 1.0):
    return None if value is None or not tokens else value * scale / tokens


def row_of(r: dict) -> dict:
    """The summary figures of one flashmoe measurement."""
    d = r["decode"]
    n = d["tokens"]
    return {
        "decode_tps": r["decode_tps"],
        "expert_io_ms_per_token": _per_token(d.get("expert_io_seconds"), n, 1000),
        "hit_rate": d.get("hit_rate"),
        "mb_read_per_token": _per_token(d.get("expert_bytes_read"), n, 1e-6),
        "disk_mb_per_token_proc": _per_token(d.get("proc_read_bytes"), n, 1e-6),
        "disk_mb_per_token_device": _per_token(d.get("disk_read_bytes"), n, 1e-6),
        "ttft_ms": r["ttft_s"] * 1000,
        "prompt_tps": r["prompt_tps"],
        "peak_rss_mb": r["max_rss"] / 1e6,
    }


def _median_row(reps: list[dict]) -> dict:
    """One row per configuration: the median of each figure over the repeats that ran."""
    ok = [r for r in reps if "error" not in r]
    if not ok:
        return reps[0]
    out = dict(ok[0], repeats=len(ok), decode_tps_runs=[r["decode_tps"] for r in ok])
    for key, value in ok[0].items():
        if isinstance(value, float):
            vals = [r[key] for r in ok if r.get(key) is not None]
            out[key] = statistics.median(vals) if vals else None
    out["cache_evicted"] = any(r.get("cache_evicted") for r in ok)
    return out


def _llama_bench(args, tokens: int, cap: int | None) -> dict:
    """llama.cpp's llama-bench on ``--gguf`` (``--repack 0``), under the same cap."""
    from .cgroup import MemoryCgroup

    cmd = [args.llama_bench, "-m", args.gguf, "-p", "64", "-n", str(tokens), "--repack", "0"]
    cmd += ["-r", "1", "-o", "json"]
    group = MemoryCgroup(cap) if cap else None
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, preexec_fn=group.preexec if group else None
        )
        peak = group.peak_bytes() if group else None
    finally:
        if group:
            group.remove()
    if proc.returncode != 0:
        return {"command": cmd, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    runs = json.loads(proc.stdout)
    gen = [r for r in runs if r.get("n_gen")]
    return {
        "command": cmd,
        "decode_tps": gen[0]["avg_ts"] if gen else None,
        "cgroup_peak_bytes": peak,
        "raw": runs,
    }


def plot(path: Path, rows: list[dict]) -> str | None:
    """tok/s and expert I/O ms/token against cache-io-split; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("decode_tps") is not None:
            key = (r["mode"], r["io_threads"], r["bank_experts"], r["k"])
            groups.setdefault(key, []).append(r)
    for (mode, threads, bank, k), rs in groups.items():
        rs.sort(key=lambda r: r["cache_io_split"])
        label = f"{mode}, {threads} threads, bank {bank}, k {k}"
        xs = [r["cache_io_split"] for r in rs]
        a.plot(xs, [r["decode_tps"] for r in rs], marker="o", label=label)
        b.plot(xs, [r["expert_io_ms_per_token"] for r in rs], marker="o", label=label)
    a.set(xlabel="cache-io-split", ylabel="decode tok/s", title="decode speed")
    b.set(xlabel="cache-io-split", ylabel="expert I/O ms/token", title="expert I/O")
    a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def run(args) -> int:
    index, root = open_layout(args.layout)
    files = pagecache.files_of(root)
    layout_bytes = layout_files_bytes(files)
    source = None if args.no_mlx_lm else source_of(index, args.source)
    cap = int(args.memory_cap * GiB) if args.memory_cap else None
    if args.llama_bench and not args.gguf:
        raise BenchError("--llama-bench needs --gguf (a GGUF of the same model)")
    if args.repeat < 1 or args.tokens < 2:
        raise BenchError("--repeat must be >= 1 and --tokens >= 2")
    modes = ["cold", "warm"] if args.both else ["cold"] if args.cold else ["warm"]
    notes = []
    if cap:
        try:
            check_available()
        except CgroupError as e:
            raise BenchError(f"--memory-cap: {e}") from None
        if args.warm or args.both:
            notes.append("--memory-cap: cold runs only (pages cached outside the cap are free)")
        modes = ["cold"]
        if layout_bytes < 3 * cap:
            notes.append(
                f"the layout ({layout_bytes / GiB:.2f} GiB) is only {layout_bytes / cap:.1f}x "
                "the cap (>= 3x makes the bank and page cache unable to hold it)"
            )
    budget = args.memory_budget or (args.memory_cap - 0.1 if cap else None)
    banks = args.bank_experts or ([None] if budget else [max(index.top_k, index.num_experts // 4)])
    ks = args.k or [None]
    for note in notes:
        print(f"flashmoe-bench: note: {note}", file=sys.stderr)

    disk = block_device(root)
    base = {"prompt": args.prompt, "max_tokens": args.tokens, "block_device": disk}
    rows: list[dict] = []
    raw: list[dict] = []
    grid = list(itertools.product(modes, args.splits, args.io_threads, banks, ks))
    per_config: dict[int, list[dict]] = {}
    total = len(grid) * args.repeat
    done = 0
    for rep in range(args.repeat):  # repeats interleave: a noisy minute hits every config alike
        for i, (mode, split, threads, bank, k) in enumerate(grid):
            opts = {"cache_io_split": split, "io_threads": threads, "reader": args.reader, "k": k}
            if bank:
                opts["bank_experts"] = bank
            else:
                opts["memory_budget_gb"] = budget
            resident = _prepare(files, mode)
            spec = dict(base, engine="flashmoe", path=str(root), options=opts)
            r = run_worker(spec, memory_cap=cap, timeout=args.timeout)
            r.update(mode=mode, resident_before=resident, repeat=rep)
            raw.append(r)
            row = {"mode": mode, "cache_io_split": split, "io_threads": threads}
            row.update(k=k or index.top_k, bank_experts=r.get("bank_experts", bank))
            if "error" in r:
                row["error"] = r["error"]
            else:
                row.update(row_of(r))
                if mode == "warm" and (row["disk_mb_per_token_proc"] or 0) > 1.0:
                    row["cache_evicted"] = True
                    print(
                        "flashmoe-bench: warning: the page cache was evicted during a warm run "
                        f"({row['disk_mb_per_token_proc']:.1f} MB/token read from disk; another "
                        "process dropping caches?)",
                        file=sys.stderr,
                    )
            if r.get("cgroup"):
                row["cgroup_peak_mb"] = (r["cgroup"]["peak_bytes"] or 0) / 1e6
            per_config.setdefault(i, []).append(row)
            done += 1
            print(
                f"[{done}/{total}] {mode} split {split} threads {threads} "
                f"bank {row['bank_experts']} k {row['k']}: "
                + (
                    row.get("error")
                    or f"{row['decode_tps']:.2f} tok/s, "
                    f"{row['expert_io_ms_per_token']:.1f} ms I/O/token"
                ),
                file=sys.stderr,
            )
    rows = [_median_row(per_config[i]) for i in range(len(grid))]

    baselines = []
    if source:
        src_files = pagecache.files_of(source)
        for mode in modes:
            resident = _prepare(src_files, mode)
            spec = dict(base, engine="mlx-lm", path=str(source))
            r = run_worker(spec, memory_cap=cap, timeout=args.timeout)
            r.update(mode=mode, resident_before=resident)
            baselines.append(r)
    llama = _llama_bench(args, args.tokens, cap) if args.llama_bench else None

    ours = [r for r in raw if "tokens" in r and (r.get("top_k") == index.top_k)]
    ref = next((b for b in baselines if "tokens" in b), None)
    same = None
    if ref and ours:
        same = all(r["tokens"] == ref["tokens"] for r in ours)

    columns_rows = [
        [
            r["mode"] + (" (cache evicted!)" if r.get("cache_evicted") else ""), r["cache_io_split"], r["io_threads"], r["bank_experts"], r["k"],
            r.get("decode_tps"), r.get("expert_io_ms_per_token"),
            None if r.get("hit_rate") is None else f"{r['hit_rate'] * 100:.1f}%",
            r.get("mb_read_per_token"), r.get("disk_mb_per_token_proc"),
            r.get("disk_mb_per_token_device"), r.get("ttft_ms"), r.get("prompt_tps"),
            r.get("peak_rss_mb") if "error" not in r else r["error"],
        ]
        + ([r.get("cgroup_peak_mb")] if cap else [])
        for r in rows
    ]  # fmt: skip
    mlx_rows = []
    for b in baselines:
        if "error" in b:
            note = "does not fit under the cap" if b.get("oom") else b["error"]
            mlx_rows.append(["mlx-lm", b["mode"], None, None, None, None, note])
        else:
            note = f"peak MLX {b['mlx_peak_memory'] / 1e6:.0f} MB"
            mlx_rows.append(
                ["mlx-lm", b["mode"], b["decode_tps"], b["ttft_s"] * 1000, b["prompt_tps"],
                 b["max_rss"] / 1e6, note]
            )  # fmt: skip
        if b.get("cgroup"):
            mlx_rows[-1][-1] += f"; cgroup peak {(b['cgroup']['peak_bytes'] or 0) / 1e6:.0f} MB"
    if llama:
        mlx_rows.append(
            ["llama.cpp", "-", llama.get("decode_tps"), None, None, None, llama.get("error", "")]
        )

    machine = describe(root)
    out = output_path(args.json, "sweep")
    result = {
        "command": command_line(),
        "machine": machine,
        "layout": str(root),
        "layout_bytes": layout_bytes,
        "source": str(source) if source else None,
        "memory_cap_bytes": cap,
        "memory_budget_gb": budget,
        "tokens": args.tokens,
        "repeat": args.repeat,
        "prompt": args.prompt,
        "notes": notes,
        "columns": COLUMNS + (["cgroup peak MB"] if cap else []),
        "rows": rows,
        "mlx_lm": baselines,
        "llama_cpp": llama,
        "tokens_identical_to_mlx_lm": same,
        "runs": raw,
    }
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    result["plot"] = plot(png, rows)
    write_json(out, result)
    print(f"machine: {summary(machine)}")
    print(
        f"layout: {root} ({layout_bytes / GiB:.2f} GiB, {len(index.layers)} MoE layers x "
        f"{index.num_experts} experts of {index.expert_bytes / 1e6:.2f} MB, top-{index.top_k})"
        + (f"; memory cap {args.memory_cap} GiB" if cap else "")
    )
    print(
        f"decode: {args.tokens} tokens after a fixed prompt, one fresh process per run; "
        f"median of {args.repeat} run(s) per row\n"
    )
    print(table(COLUMNS + (["cgroup peak MB"] if cap else []), columns_rows))
    if mlx_rows:
        print()
        print(table(MLX_COLUMNS, mlx_rows))
    if same is not None:
        print(f"\ntokens identical to stock mlx-lm: {same}")
    for note in notes:
        print(f"note: {note}")
    print(
        f"\nJSON: {out}"
        + (
            f"\nplot: {result['plot']}"
            if result["plot"]
            else "\nplot: skipped (pip install 'flashmoe[bench]' for matplotlib)"
        )
    )
    return 0
