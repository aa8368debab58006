"""``flashmoe-bench gpu LAYOUT``: stock mlx-lm and flashmoe side by side in one process.

Built for short leases on an accelerator (MLX CUDA or Metal): the kernels compile once, and every
row reuses them. Per configuration (bank size x residency mode x warm/cold):

- prefill logits of the prompt and ``--tokens`` decoded tokens (``--decode``: spread, the default,
  or greedy), compared with stock mlx-lm on the source checkpoint (same prompt, same
  ``generate_step`` loop);
- decode tok/s (after the first token), TTFT, and over the decode steps only (the prompt's reads
  are in ``prompt_mb`` / ``prompt_io_ms``): hit rate, MB read and expert I/O ms per token;
- with ``--timing``, a second pass with a sync per phase: dense, router sync and expert compute
  ms per token.

A full bank is filled (every expert read) before the clock starts, so its row measures the first
tokens after the fill (after a 4-token warm-up that compiles the row's kernels, as stock mlx-lm
gets one). Partial banks start empty with the page cache warm (or dropped, cold).
Reference rates measured in the same run: host -> device copies of the same bytes (pageable and
pinned), and the disk's own O_DIRECT random-read rate at the request size of the split.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import random
import statistics
import time
from pathlib import Path

from . import pagecache
from .report import (
    BenchError,
    command_line,
    int_list,
    open_layout,
    output_path,
    source_of,
    table,
    write_json,
)

MODES = ("staged", "prefetch", "off")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("layout", help="flashmoe layout directory")
    p.add_argument("--source", help="source checkpoint (default: the index's source path)")
    p.add_argument("--banks", default="all,50%,25%,min", help="bank sizes: N, P%%, all, min")
    p.add_argument("--modes", default="staged", help=f"CUDA residency modes ({','.join(MODES)})")
    p.add_argument("--splits", type=int_list, default=[4], help="cache-io-split list")
    p.add_argument("--prefetch", default="off", help="read-ahead modes to compare, e.g. off,on")
    p.add_argument("--hits-first", default="on", help="hits-first settings to compare: on,off")
    p.add_argument(
        "--eager",
        default="presync",
        help="decode steps' work handed to MLX as soon as built: presync (the experts launched "
        "before the router sync, the attention committed early), presync-norms (the norms "
        "too), presync-bare (no early commit), presync-nowait (a layer launches its experts "
        "without waiting for its guesses still landing), on (no presync; the expert output and the "
        "decoder layers' other modules committed early), experts (the expert output only), off "
        "(all at the next sync); e.g. presync,on",
    )
    p.add_argument("--policies", default="lfu", help="bank policies to compare, e.g. lfu,lru")
    p.add_argument(
        "--decode",
        choices=("spread", "greedy"),
        default="spread",
        help="decoded tokens: spread (greedy plus a seeded offset per step, so the routing "
        "varies as in real text; default) or greedy (a random-weight model repeats itself: "
        "after the prompt, next to no misses)",
    )
    p.add_argument("--io-threads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--cold", action="store_true", help="also run cold (--direct-io) rows")
    p.add_argument("--timing", action="store_true", help="add per-phase timing (extra pass)")
    p.add_argument("--repeat", type=int, default=1, help="decode passes per row (median)")
    p.add_argument("--json", help="output JSON (default flashmoe-bench-out/gpu-<time>.json)")


def _banks(spec: str, num_experts: int, top_k: int) -> list[int]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            out.append(num_experts)
        elif part == "min":
            out.append(top_k)
        elif part.endswith("%"):
            out.append(max(top_k, round(num_experts * float(part[:-1]) / 100)))
        else:
            out.append(int(part))
    return list(dict.fromkeys(out))


def spread_sampler(seed: int = 0):
    """The greedy token plus a seeded pseudo-random offset per step, modulo the vocabulary.

    Greedy decoding of a random-weight model soon repeats itself, and so does its routing: after
    the prompt every expert it routes to is resident (measured: 100 % hits at a 25 % bank) and
    no decode step misses. The offsets keep the tokens, and so the routing, varied; each step
    still depends on the last one's logits, as in real decoding, and the stream is the same for
    every model that computes the same logits.
    """
    import mlx.core as mx

    rng = random.Random(seed)

    def sample(logits):
        return (mx.argmax(logits, axis=-1) + rng.randrange(1, 1 << 20)) % logits.shape[-1]

    return sample


def _decode(model, prompt, tokens: int, on_first=None, decode: str = "greedy"):
    """(first-step seconds, decode tok/s, token ids) through mlx-lm's own ``generate_step``,
    ``decode`` greedy or ``spread`` (``spread_sampler``); ``on_first()`` runs when the first
    token arrives (the prompt's work is done then)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    ids = []
    t0 = time.perf_counter()
    first = t1 = None
    sampler = spread_sampler() if decode == "spread" else (lambda x: mx.argmax(x, axis=-1))
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=tokens, sampler=sampler):
        ids.append(int(tok))
        if first is None:
            if on_first is not None:
                on_first()
            t1 = time.perf_counter()
            first = t1 - t0
    rate = (len(ids) - 1) / (time.perf_counter() - t1) if len(ids) > 1 else 0.0
    return first, rate, ids


def _prefill_logits(model, prompt):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    logits = model(mx.array(prompt)[None], cache=make_prompt_cache(model))
    mx.eval(logits)
    return logits


def reference_rates(index, layer_files: list[Path], split: int, threads: int) -> dict:
    """GB/s: host -> device copies (pageable, pinned) and O_DIRECT random reads of the layout."""
    import mlx.core as mx
    import numpy as np

    from ..layouts.plan import split_plan
    from ..metal import cuda
    from ..metal.bank import ExpertBank
    from ..runtime.reader import DIRECT_ALIGNMENT, ReadRequest, make_reader, open_for_reading

    out: dict = {}
    record, nbytes = index.record_size, index.expert_bytes
    count = 32
    found = cuda.detect()
    if found is not None:
        dev, _ = found
        dst = mx.zeros((count * nbytes,), dtype=mx.uint8)
        mx.eval(dst)
        d = cuda.address(memoryview(dst).cast("B"))
        host = np.frombuffer(os.urandom(count * nbytes), dtype=np.uint8).copy()
        pinned = dev.pinned(count * nbytes)
        pinned[:] = host.tobytes()
        for name, src in (("pageable", host.ctypes.data), ("pinned", cuda.address(pinned))):
            dev.bind()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                dev.copy_to_device(
                    [(d + i * nbytes, src + i * nbytes, nbytes) for i in range(count)]
                )
                dev.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"h2d_{name}_gb_s"] = count * nbytes / statistics.median(times) / 1e9
    # the disk: O_DIRECT reads of random records at the split's request size, into page-aligned
    # host memory, no device copy (what the disk and the read pool can do on their own)
    plan = split_plan(nbytes, index.alignment, split)
    chunk = max(b - a for a, b in plan)
    chunk = -(-chunk // 4096) * 4096
    if found is not None:
        mem = found[0].pinned(threads * 4 * chunk)
    else:
        buf = ExpertBank._allocate((threads * 4 * chunk,), mx.uint8, DIRECT_ALIGNMENT)
        mx.eval(buf)
        mem = memoryview(buf).cast("B")
    reader = make_reader("auto", threads=threads)
    fds = [open_for_reading(str(p), direct=True) for p in layer_files]
    try:
        pagecache.drop(layer_files)
        rng = random.Random(0)
        reqs = []
        n = min(len(layer_files) * index.num_experts, 256)
        picks = rng.sample([(f, e) for f in range(len(fds)) for e in range(index.num_experts)], n)
        slot = 0
        t0 = time.perf_counter()
        total = 0
        for f, e in picks:
            for a, b in plan:
                length = -(-(b - a) // 4096) * 4096
                view = mem[slot * chunk : slot * chunk + length]
                reqs.append(ReadRequest(fds[f], e * record + a, (view,), str(layer_files[f])))
                total += length
                slot = (slot + 1) % (threads * 4)
                if len(reqs) == threads * 4:
                    reader.submit(reqs).wait()
                    reqs = []
        if reqs:
            reader.submit(reqs).wait()
        out["disk_odirect_gb_s"] = total / (time.perf_counter() - t0) / 1e9
        out["disk_request_bytes"] = chunk
    finally:
        for fd in fds:
            os.close(fd)
        reader.close()
    return out


def run(args) -> int:
    import mlx.core as mx
    from mlx_lm import load as lm_load

    from ..runtime import load

    index, root = open_layout(args.layout)
    src = source_of(index, args.source)
    if src is None:
        raise BenchError("no source checkpoint: pass --source")
    modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise BenchError(f"unknown residency mode(s) {bad}; expected {MODES}")
    rng = random.Random(0)
    vocab = index.config.get("vocab_size") or index.config.get("text_config", {}).get("vocab_size")
    prompt = [rng.randrange(vocab) for _ in range(args.prompt_tokens)]
    layer_files = [root / e.file for e in index.layers]
    banks = _banks(args.banks, index.num_experts, index.top_k)

    print(
        f"device: {mx.default_device()}  layout: {root}  banks: {banks}  modes: {modes}", flush=True
    )
    t = time.perf_counter()
    stock, _ = lm_load(str(src))
    ref_logits = _prefill_logits(stock, prompt)
    compile_s = time.perf_counter() - t
    _decode(stock, prompt, 4, decode=args.decode)  # compiles the decode kernels
    stock_runs = [
        _decode(stock, prompt, args.tokens, decode=args.decode) for _ in range(max(1, args.repeat))
    ]
    stock_ids = stock_runs[0][2]
    stock_tps = statistics.median(r[1] for r in stock_runs)
    print(
        f"stock mlx-lm: {stock_tps:.1f} tok/s (load + first prefill {compile_s:.1f} s)", flush=True
    )

    rows, results = [], []
    for cold in [False, True] if args.cold else [False]:
        for bank in banks:
            for split in args.splits:
                for mode in modes:
                    for ahead, hf, eager, policy in itertools.product(
                        args.prefetch.split(","),
                        args.hits_first.split(","),
                        args.eager.split(","),
                        args.policies.split(","),
                    ):
                        os.environ["FLASHMOE_CUDA_RESIDENCY"] = mode
                        try:
                            r = _measure(
                                args, root, bank, split, cold, prompt, ref_logits, stock_ids,
                                load, layer_files, index, ahead.strip(), hf.strip() == "on",
                                eager.strip(), policy.strip(),
                            )  # fmt: skip
                        except Exception as e:  # keep the other rows
                            print(f"bank {bank} split {split} {mode}: FAILED {e}", flush=True)
                            continue
                        r.update(mode=mode, stock_tok_s=stock_tps, ratio=r["tok_s"] / stock_tps)
                        results.append(r)
                        rows.append(_row(r))
                        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    os.environ.pop("FLASHMOE_CUDA_RESIDENCY", None)
    refs = reference_rates(index, layer_files, args.splits[0], args.io_threads)
    columns = [
        "bank", "split", "pages", "mode", "ahead/hits-first/eager/policy", "tok/s", "x stock", "TTFT ms", "hit %",
        "MB/token", "exposed I/O ms", "sync ms", "host ms", "ahead ms", "precision %", "unused %", "I/O GB/s",
        "dense ms", "router ms", "compute ms", "identical",
    ]  # fmt: skip
    print(table(columns, rows))
    summary = summarize(results)
    if any(s["rows"] > 1 for s in summary):
        print(table(SUMMARY_COLUMNS, [_summary_row(s) for s in summary]))
    print(
        f"stock mlx-lm {stock_tps:.1f} tok/s; reference rates: "
        + ", ".join(f"{k} {v:.2f}" for k, v in refs.items())
    )
    path = output_path(args.json, "gpu")
    write_json(
        path,
        {
            "command": command_line(),
            "device": str(mx.default_device()),
            "stock_tok_s": stock_tps,
            "stock_first_load_prefill_s": compile_s,
            "references": refs,
            "rows": results,
            "summary": summary,
        },
    )
    print(f"wrote {path}")
    return 0


SUMMARY_COLUMNS = ["bank", "split", "pages", "mode", "configuration", "rows", "median tok/s",
                   "vs", "pair ratio (geo. mean)", "pairs won"]  # fmt: skip


def summarize(results: list[dict]) -> list[dict]:
    """Rows of one configuration repeated (e.g. ``--eager presync,on,presync,on``), per bank, split,
    pages and residency mode: how many rows and their median tok/s, and against the first
    configuration of the group, its rows paired in order with that one's (the i-th with the
    i-th: alternating rows see the host's drift alike): the geometric mean of the tok/s ratios
    and how many pairs it won."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in results:
        key = (r["bank"], r["split"], r["pages"], r["mode"])
        groups.setdefault(key, {}).setdefault(_config_label(r), []).append(r["tok_s"])
    out = []
    for (bank, split, pages, mode), configs in groups.items():
        base_label, base = next(iter(configs.items()))
        for label, rates in configs.items():
            entry = {"bank": bank, "split": split, "pages": pages, "mode": mode,
                     "configuration": label, "rows": len(rates),
                     "median_tok_s": statistics.median(rates)}  # fmt: skip
            pairs = list(zip(rates, base, strict=False))
            if label != base_label and pairs:
                logs = [math.log(a / b) for a, b in pairs]
                entry.update(vs=base_label, pair_ratio=math.exp(statistics.fmean(logs)),
                             pairs_won=sum(a > b for a, b in pairs), pairs=len(pairs))  # fmt: skip
            out.append(entry)
    return out


def _summary_row(s: dict) -> list:
    ratio = s.get("pair_ratio")
    return [
        s["bank"], s["split"], s["pages"], s["mode"], s["configuration"], s["rows"],
        f"{s['median_tok_s']:.1f}", s.get("vs", "-"), "-" if ratio is None else f"{ratio:.3f}",
        f"{s['pairs_won']} of {s['pairs']}" if "pairs" in s else "-",
    ]  # fmt: skip


def _measure(
    args, root, bank, split, cold, prompt, ref_logits, stock_ids, load, files, index, prefetch,
    hits_first=True, eager="presync", policy="lfu",
):  # fmt: skip
    import mlx.core as mx

    kw = dict(
        bank_experts=bank,
        cache_io_split=split,
        io_threads=args.io_threads,
        direct_io=cold,
        prefetch=prefetch,
        hits_first=hits_first,
        bank_policy=policy,
    )
    t = time.perf_counter()
    model, _ = load(str(root), **kw)  # a bank of every expert is filled here
    load_s = time.perf_counter() - t
    store = model.flashmoe.store
    _set_eager(store, eager)
    full = bank == index.num_experts
    out = {
        "bank": bank,
        "split": split,
        "pages": "cold" if cold else "warm",
        "prefetch": prefetch,
        "hits_first": hits_first,
        # where a routed expert's row depends on its gather_qmm call (CUDA at real sizes), a
        # step with misses is computed whole: hits first is then asked for but has no effect
        "hits_first_effective": hits_first and store.rows_exact,
        "eager": eager,
        "policy": store.policy,
    }
    try:
        out["residency"] = None
        if full:
            out["fill_s"] = load_s  # the load, with every expert read into the bank
        elif not cold:
            pagecache.warm(files)
        logits = _prefill_logits(model, prompt)
        out["residency"] = store.residency
        out["prefill_identical"] = bool(mx.array_equal(logits, ref_logits).item())
        # compile this row's decode kernels (e.g. the full bank's id->slot gather) off the clock,
        # as stock mlx-lm's warm-up does; partial banks are emptied again below
        _decode(model, prompt, 4, decode=args.decode)
        runs = []
        for _ in range(max(1, args.repeat)):
            if not full:
                store.clear_banks()
                if cold:
                    pagecache.drop(files)
            s = store.stats
            s.reset()
            prompt_io = {}

            def decode_only(s=s, prompt_io=prompt_io):
                # the prompt's reads (a fresh bank reads the union of its experts, none ahead)
                # are reported apart: the per-token counters below are the decode steps'
                prompt_io.update(prompt_mb=s.bytes_read / 1e6, prompt_io_ms=s.io_seconds * 1000)
                s.reset()

            first, rate, ids = _decode(
                model, prompt, args.tokens, on_first=decode_only, decode=args.decode
            )
            # generate_step builds each step before it yields the last: the counters cover the
            # steps after the first token, one per token counted by ``rate``
            n = max(1, len(ids) - 1)
            runs.append(
                dict(
                    **prompt_io,
                    tok_s=rate,
                    ttft_ms=first * 1000,
                    hit_rate=s.hit_rate,
                    mb_per_token=s.bytes_read / n / 1e6,
                    io_ms_per_token=s.io_seconds * 1000 / n,
                    sync_ms_per_token=s.sync_seconds * 1000 / n,
                    host_ms_per_token=s.host_seconds * 1000 / n,
                    io_gb_s=s.bytes_read / s.io_seconds / 1e9 if s.io_seconds else None,
                    prefetch_ms_per_token=s.prefetch_seconds * 1000 / n,
                    prefetch_precision=s.prefetch_precision,
                    prefetch_recall=s.prefetch_recall,
                    unused_share=s.prefetch_unused_bytes / s.bytes_read if s.bytes_read else 0.0,
                    tokens_identical=ids == stock_ids,
                )
            )
        best = sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2]
        out.update(best)
        out["runs_tok_s"] = [r["tok_s"] for r in runs]
        out["tokens_identical"] = all(r["tokens_identical"] for r in runs)
    finally:
        model.flashmoe.close()
        del model
    if args.timing:
        model, _ = load(str(root), timing=True, **kw)
        _set_eager(model.flashmoe.store, eager)
        try:
            if cold and not full:
                pagecache.drop(files)
            _decode(model, prompt, 2, decode=args.decode)
            if not full:
                model.flashmoe.store.clear_banks()
            tm = model.flashmoe.timing
            # decode steps only, as the counters above: the prompt's phases are reset when
            # the first token arrives
            _, _, ids = _decode(model, prompt, args.tokens, on_first=tm.reset, decode=args.decode)
            n = max(1, len(ids) - 1)
            out.update(
                dense_ms=tm.dense * 1000 / n,
                router_ms=tm.router * 1000 / n,
                compute_ms=tm.compute * 1000 / n,
            )
        finally:
            model.flashmoe.close()
            del model
    mx.clear_cache()
    return out


EAGER = ("presync", "presync-norms", "presync-bare", "presync-nowait", "on", "experts", "off")


def _eager_label(mode) -> str:
    # rows of older JSON files hold a bool (True: the expert output only)
    if isinstance(mode, bool):
        mode = "experts" if mode else "off"
    labels = {"on": "eager", "experts": "eager-x", "off": "lazy"}
    return labels.get(mode, mode)


def _set_eager(store, mode: str) -> None:
    if mode not in EAGER:
        raise BenchError(f"--eager takes {', '.join(EAGER)}, not {mode!r}")
    store.eager = mode != "off"
    store.eager_layers = mode in ("presync", "presync-norms", "presync-nowait", "on")
    store.early_norms = mode in ("presync-norms", "on")
    store.presync = mode.startswith("presync")
    store.guesses_before_launch = mode != "presync-nowait"


def _config_label(r: dict) -> str:
    return (
        f"{r['prefetch']}/{'hf' if r.get('hits_first_effective', r.get('hits_first', True)) else '-'}"
        f"/{_eager_label(r.get('eager', 'on'))}/{r.get('policy', 'lru')}"
    )


def _row(r: dict) -> list:
    def f(v, d=1):
        return "-" if v is None else f"{v:.{d}f}"

    return [
        r["bank"], r["split"], r["pages"], f"{r['mode']}->{r.get('residency')}", _config_label(r),
        f(r["tok_s"]), f(r["ratio"], 2), f(r["ttft_ms"], 0), f(r["hit_rate"] * 100),
        f(r["mb_per_token"]), f(r["io_ms_per_token"]), f(r.get("sync_ms_per_token"), 2),
        f(r.get("host_ms_per_token"), 2), f(r.get("prefetch_ms_per_token")),
        f(r.get("prefetch_precision", 0) * 100), f(r.get("unused_share", 0) * 100),
        f(r.get("io_gb_s"), 2), f(r.get("dense_ms"), 2),
        f(r.get("router_ms"), 2), f(r.get("compute_ms"), 2),
        r["prefill_identical"] and r["tokens_identical"],
    ]  # fmt: skip
