"""One benchmark measurement in a fresh process: ``python -m flashmoe.bench.worker SPEC_JSON``.

Loads either a flashmoe layout (``engine: flashmoe``) or a checkpoint with stock mlx-lm
(``engine: mlx-lm``), then runs ``mode: decode`` (greedy ``generate_step`` of exactly
``max_tokens`` tokens after ``prompt``: TTFT, prompt and decode tok/s, expert I/O, disk reads,
peak memory) or ``mode: ppl`` (per-token negative log-likelihood over ``tokens`` for each ``k``).
The result is printed as the last stdout line, after ``RESULT_MARK``.
"""

from __future__ import annotations

import hashlib
import json
import resource
import sys
import time

from .machine import proc_read_bytes, sectors_read

RESULT_MARK = "@@flashmoe-bench-result@@"


def set_top_k(model, k: int) -> int:
    """Route ``k`` experts per token in every MoE block of ``model``; return the blocks changed."""
    n = 0
    for _, m in model.named_modules():
        if hasattr(m, "top_k") and hasattr(m, "switch_mlp"):
            m.top_k = k
            n += 1
    if not n:
        raise ValueError("no MoE block with top_k found")
    return n


def _load(spec: dict):
    opts = spec.get("options", {})
    t0 = time.perf_counter()
    if spec["engine"] == "flashmoe":
        from flashmoe.runtime import load

        model, tok = load(
            spec["path"],
            bank_experts=opts.get("bank_experts"),
            memory_budget_gb=opts.get("memory_budget_gb"),
            cache_io_split=opts.get("cache_io_split", 1),
            io_threads=opts.get("io_threads", 8),
            reader=opts.get("reader", "auto"),
            k=opts.get("k"),
        )
    elif spec["engine"] == "mlx-lm":
        import mlx_lm

        model, tok = mlx_lm.load(spec["path"])
        if opts.get("k"):
            set_top_k(model, opts["k"])
    else:
        raise ValueError(f"unknown engine {spec['engine']!r}")
    return model, tok, time.perf_counter() - t0


def _snapshot(model, disk: str | None) -> dict:
    s = {"t": time.perf_counter(), "disk": sectors_read(disk), "proc": proc_read_bytes()}
    rt = getattr(model, "flashmoe", None)
    if rt is not None:
        st = rt.store.stats
        s.update(hits=st.hits, misses=st.misses, bytes=st.bytes_read, io=st.io_seconds)
    return s


def _delta(a: dict, b: dict, key: str):
    return None if a.get(key) is None or b.get(key) is None else b[key] - a[key]


def _phase(a: dict, b: dict, tokens: int) -> dict:
    out = {"seconds": b["t"] - a["t"], "tokens": tokens}
    for k in ("disk", "proc"):
        d = _delta(a, b, k)
        out[f"{k}_read_bytes"] = d
    if "hits" in a:
        hits, misses = b["hits"] - a["hits"], b["misses"] - a["misses"]
        out.update(
            hits=hits,
            misses=misses,
            hit_rate=hits / (hits + misses) if hits + misses else None,
            expert_bytes_read=b["bytes"] - a["bytes"],
            expert_io_seconds=b["io"] - a["io"],
        )
    return out


def _generate(model, prompt, n: int):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    return generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(0.0))


def decode(spec: dict) -> dict:
    """Greedy decode of exactly ``max_tokens`` tokens (no EOS stop) after the prompt."""
    import mlx.core as mx

    model, tok, load_s = _load(spec)
    prompt = spec.get("prompt_ids") or tok.encode(spec["prompt"])
    n = spec["max_tokens"]
    disk = spec.get("block_device")
    for _ in range(spec.get("warmup", 0)):
        for _ in _generate(model, prompt, n):
            pass
    mx.reset_peak_memory()
    rt = getattr(model, "flashmoe", None)
    if rt is not None:
        rt.store.stats.reset()
    start = _snapshot(model, disk)
    first = None
    tokens = []
    for token, _ in _generate(model, prompt, n):
        if first is None:
            first = _snapshot(model, disk)
        tokens.append(int(token))
    end = _snapshot(model, disk)
    assert first is not None
    prefill = _phase(start, first, len(prompt))
    dec = _phase(first, end, len(tokens) - 1)
    result = {
        "engine": spec["engine"],
        "path": spec["path"],
        "load_seconds": load_s,
        "prompt_tokens": len(prompt),
        "ttft_s": prefill["seconds"],
        "prompt_tps": len(prompt) / prefill["seconds"],
        "decode_tokens": len(tokens),
        "decode_tps": (len(tokens) - 1) / dec["seconds"] if dec["seconds"] else None,
        "prefill": prefill,
        "decode": dec,
        "tokens": tokens,
        "prompt_ids": list(prompt),
        "mlx_peak_memory": mx.get_peak_memory(),
        "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        * (1 if sys.platform == "darwin" else 1024),
    }
    if rt is not None:
        result["bank_experts"] = rt.slots
        result["top_k"] = rt.top_k
        result["budget_note"] = rt.budget_note
        result["num_experts"] = rt.index.num_experts
        result["expert_bytes"] = rt.index.expert_bytes
        result["moe_layers"] = len(rt.index.layers)
        result["dense_bytes"] = rt.index.dense.size
    return result


def perplexity(spec: dict) -> dict:
    """Per-token NLL of ``tokens`` (windows of ``window``) for each ``k`` in ``ks`` (None = config)."""
    import mlx.core as mx
    import numpy as np

    model, _, load_s = _load(spec)
    tokens = spec["tokens"]
    window = spec.get("window", 256)
    runs = []
    full_logprobs: list | None = None
    for k in spec.get("ks", [None]):
        if k is not None:
            set_top_k(model, k)
        nll: list[float] = []
        digest = hashlib.sha256()
        logprobs_all = []
        t0 = time.perf_counter()
        for start in range(0, len(tokens) - 1, window):
            chunk = tokens[start : start + window + 1]
            logits = model(mx.array(chunk[:-1])[None]).astype(mx.float32)[0]
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            target = mx.array(chunk[1:])
            nl = -mx.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
            mx.eval(lp, nl)
            arr = np.array(logits)
            digest.update(arr.tobytes())
            logprobs_all.append(np.array(lp))
            nll.extend(float(x) for x in np.array(nl))
        lps = np.concatenate(logprobs_all)
        run = {
            "k": k,
            "tokens": len(nll),
            "seconds": time.perf_counter() - t0,
            "nll_mean": float(np.mean(nll)),
            "ppl": float(np.exp(np.mean(nll))),
            "nll": nll,
            "logits_sha256": digest.hexdigest(),
        }
        if full_logprobs is None:
            full_logprobs = lps
        else:
            p = np.exp(full_logprobs)
            run["kl_vs_first"] = float(np.mean(np.sum(p * (full_logprobs - lps), axis=-1)))
            run["top1_agreement_vs_first"] = float(
                np.mean(np.argmax(full_logprobs, -1) == np.argmax(lps, -1))
            )
        runs.append(run)
    return {"engine": spec["engine"], "path": spec["path"], "load_seconds": load_s, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0] if argv else sys.stdin.read())
    result = perplexity(spec) if spec.get("mode") == "ppl" else decode(spec)
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
