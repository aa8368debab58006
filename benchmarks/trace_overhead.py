"""What recording a routing trace costs the decode loop: generation with and without a trace,
alternating in one process (A/B/A/B, same model, same prompt, bank emptied before every run), so
that drift and neighbours' load hit both sides alike::

    python benchmarks/trace_overhead.py --pairs 4 --tokens 400 --json benchmarks/out/trace.json

The model is a small synthetic one (``flashmoe-bench synth``'s ``synthesize`` with the 397B
routing geometry, 512 experts top-10, realistic routing; tiny experts and hidden 1024, CPU MLX),
built once under ``--dir``; the bank holds ``--bank`` of 512 experts per layer. ``CHUNK_IDS`` of
``flashmoe.runtime.trace`` is lowered (``--chunk-ids``) so that every traced run writes several
chunks. Per run: decode tok/s (after the first token), the slowest decode step, and the steps in
which the writer made a chunk (synchronous writers encode it there); per pair: traced / untraced
tok/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from flashmoe.bench.synth import small_config, synthesize
from flashmoe.convert import convert_checkpoint
from flashmoe.runtime import load
from flashmoe.runtime import trace as trace_mod
from mlx_lm.generate import generate_step

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--dir", type=Path, default=Path("benchmarks/out/trace-overhead"))
p.add_argument("--layers", type=int, default=8)
p.add_argument("--bank", type=int, default=64, help="bank slots per layer (of 512)")
p.add_argument("--tokens", type=int, default=400, help="decode tokens per run")
p.add_argument("--pairs", type=int, default=4, help="untraced/traced pairs (A/B/A/B...)")
p.add_argument("--chunk-ids", type=int, default=8192, help="trace CHUNK_IDS for this run")
p.add_argument("--json", type=Path, help="write the runs and the summary here")
args = p.parse_args()

ckpt, layout = args.dir / f"ckpt-{args.layers}L", args.dir / f"layout-{args.layers}L"
if not layout.exists():
    config = small_config("qwen3.5-397b", args.layers, 2048, expert_intermediate=64)
    synthesize(ckpt, "qwen3.5-397b", args.layers, config=config, dtype="float32", progress=False)
    convert_checkpoint(ckpt, layout, progress=False)

trace_mod.CHUNK_IDS = args.chunk_ids  # the library's default is ~1 M ids: a chunk per ~1,750
model, _ = load(str(layout), bank_experts=args.bank)  # tokens of 60 layers, not of a short run
rt = model.flashmoe
store = rt.store
prompt = mx.array(list(range(1, 33)))
tmp = Path(tempfile.mkdtemp(prefix="trace-overhead-"))


def chunks(path: Path) -> int:
    """Chunks in a trace file (its length-prefixed bodies after the header)."""
    data = path.read_bytes()
    pos, n = 12 + struct.unpack_from("<I", data, 8)[0], 0
    while pos < len(data):
        pos += 4 + struct.unpack_from("<I", data, pos)[0]
        n += 1
    return n


def run(traced: bool, tokens: int) -> dict:
    """One generation from an empty bank; per-step seconds of the decode steps."""
    store.clear_banks()
    path = tmp / "run.fmt"
    if traced:
        meta = {"model": layout.name, "slots": rt.slots}
        store.trace = trace_mod.TraceWriter(
            path,
            num_layers=args.layers,
            num_experts=store.index.num_experts,
            top_k=rt.top_k,
            meta=meta,
        )
    steps, last, handed, prev = [], None, [], 0  # handed: the steps that made a chunk
    for _ in generate_step(prompt, model, max_tokens=tokens):
        now = time.perf_counter()
        if last is not None:
            steps.append(now - last)
        last = now
        if traced:  # the writer's buffer shrank: this step made a chunk (either writer version)
            buffered = len(store.trace._records)
            if steps and buffered < prev:
                handed.append(len(steps) - 1)
            prev = buffered
    out = {"traced": traced, "tok_s": len(steps) / sum(steps), "max_step_ms": 1e3 * max(steps)}
    out["median_step_ms"] = 1e3 * statistics.median(steps)
    out["chunk_steps_ms"] = [1e3 * steps[i] for i in handed]
    if traced:
        t0 = time.perf_counter()
        store.trace.close()
        out["close_ms"] = 1e3 * (time.perf_counter() - t0)
        out["chunks"] = chunks(path)
        store.trace = None
    return out


run(True, 16)  # warm-up (both paths)
run(False, 16)
runs = [run(traced, args.tokens) for _ in range(args.pairs) for traced in (False, True)]
print(
    f"{'run':>3} {'trace':>5} {'tok/s':>7} {'median ms':>9} {'max ms':>7} {'chunks':>6}  steps making a chunk (ms)"
)
for i, r in enumerate(runs):
    print(
        f"{i:>3} {'on' if r['traced'] else 'off':>5} {r['tok_s']:7.1f} "
        f"{r['median_step_ms']:9.2f} {r['max_step_ms']:7.1f} {r.get('chunks', ''):>6}  "
        + " ".join(f"{t:.1f}" for t in r["chunk_steps_ms"])
    )
ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(runs[::2], runs[1::2], strict=True)]
summary = {
    "median_ratio": statistics.median(ratios),
    "ratios": ratios,
    "max_step_ms_off": max(r["max_step_ms"] for r in runs if not r["traced"]),
    "max_step_ms_on": max(r["max_step_ms"] for r in runs if r["traced"]),
    "chunk_step_ms_median": statistics.median(t for r in runs for t in r["chunk_steps_ms"]),
    "chunk_step_ms_max": max(t for r in runs for t in r["chunk_steps_ms"]),
    "step_ms_median": statistics.median(r["median_step_ms"] for r in runs),
}
print(
    f"traced/untraced tok/s per pair: median {summary['median_ratio']:.3f} "
    f"({', '.join(f'{r:.3f}' for r in ratios)}); slowest step: off "
    f"{summary['max_step_ms_off']:.1f} ms, on {summary['max_step_ms_on']:.1f} ms; steps making "
    f"a chunk: median {summary['chunk_step_ms_median']:.1f} ms, max "
    f"{summary['chunk_step_ms_max']:.1f} ms (all steps' median {summary['step_ms_median']:.1f} ms)"
)
if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args), "runs": runs, **summary}, default=str))
rt.close()
