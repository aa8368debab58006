"""Bit-identity of a streamed layout against stock mlx-lm on its source checkpoint, on any model.

Prefill logits of a fixed prompt and greedy tokens, for each (bank size, split) pair:

    python benchmarks/identity_check.py SRC LAYOUT [--banks 10,64] [--splits 4,1] [--tokens 6]

Exits 1 unless every run is identical. Used on the real Qwen3.5-397B layer geometry (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import sys
import time

import mlx.core as mx
import mlx_lm
import numpy as np
from flashmoe.runtime import load


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/identity_check.py")
    p.add_argument("src", help="the source checkpoint (mlx-community format)")
    p.add_argument("layout", help="its flashmoe layout")
    p.add_argument(
        "--banks", default="10,64", help="bank sizes (experts per layer), comma-separated"
    )
    p.add_argument("--splits", default="4,1", help="cache-io-split per bank size, comma-separated")
    p.add_argument("--tokens", type=int, default=6)
    p.add_argument("--prompt-tokens", type=int, default=16)
    args = p.parse_args(argv)
    prompt = list(range(10, 10 + args.prompt_tokens))

    t = time.perf_counter()
    ref, tok = mlx_lm.load(args.src)
    ref_logits = np.array(ref(mx.array(prompt)[None]).astype(mx.float32))
    ref_tokens = [r.token for r in mlx_lm.stream_generate(ref, tok, prompt, max_tokens=args.tokens)]
    print(f"mlx-lm: {time.perf_counter() - t:.0f} s, tokens {ref_tokens}", flush=True)
    del ref

    ok = True
    banks = [int(b) for b in args.banks.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    for slots, split in zip(banks, splits, strict=True):
        t = time.perf_counter()
        model, tokenizer = load(args.layout, bank_experts=slots, cache_io_split=split)
        logits = np.array(model(mx.array(prompt)[None]).astype(mx.float32))
        tokens = [
            r.token
            for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=args.tokens)
        ]
        stats = model.flashmoe.store.stats
        same = np.array_equal(logits, ref_logits) and tokens == ref_tokens
        ok &= same
        print(
            f"bank {slots} split {split}: logits identical {np.array_equal(logits, ref_logits)}, "
            f"tokens identical {tokens == ref_tokens}, misses {stats.misses}, "
            f"MB read {stats.bytes_read / 1e6:.0f}, {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        model.flashmoe.close()
        del model
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
