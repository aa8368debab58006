"""Batched decode (flashmoe-serve's shape) with and without the experts launched before the
router sync, alternating in one process:

    python benchmarks/batched_presync.py LAYOUT BANK ROWS STEPS [--batched]

ROWS sequences of 16 random prompt tokens are prefilled together, then STEPS decode steps run with
the next token spread over the vocabulary (greedy + step index, so the routing varies). Prints
rows x steps / seconds for presync off and on, three times each, and whether both decoded the same
tokens. ``--batched`` sets ``ExpertStore.presync_batched`` (the CUDA default): without it, a batch
keeps the serial path whatever ``presync`` says, which is the CPU default.
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from flashmoe.runtime import load
from mlx_lm.models.cache import make_prompt_cache

p = argparse.ArgumentParser()
p.add_argument("layout")
p.add_argument("bank", type=int)
p.add_argument("rows", type=int)
p.add_argument("steps", type=int)
p.add_argument("--batched", action="store_true", help="presync for a batch of rows too")
args = p.parse_args()
model, _ = load(args.layout, bank_experts=args.bank, cache_io_split=4)
store = model.flashmoe.store
store.presync_batched = args.batched


def run(presync: bool):
    store.presync = presync
    store.clear_banks()
    cache = make_prompt_cache(model)
    prompts = mx.array(np.random.default_rng(0).integers(1, 500, (args.rows, 16)))
    logits = model(prompts, cache=cache)
    vocab = logits.shape[-1]
    tok = mx.argmax(logits[:, -1:, :], axis=-1)
    mx.eval(tok)
    store.stats.reset()
    out = []
    t0 = time.perf_counter()
    for i in range(args.steps):
        tok = (mx.argmax(model(tok, cache=cache)[:, -1:, :], axis=-1) + i) % vocab
        mx.eval(tok)
        out.append(np.array(tok))
    rate = args.rows * args.steps / (time.perf_counter() - t0)
    return rate, np.concatenate(out, 1), store.stats.hit_rate


rates = {False: [], True: []}
tokens = {}
for _ in range(3):
    for presync in (False, True):
        rate, toks, hit = run(presync)
        rates[presync].append(round(rate, 1))
        tokens.setdefault(presync, toks)
print(f"hit rate {hit:.3f}; same tokens: {np.array_equal(tokens[False], tokens[True])}")
print("presync off tok/s", rates[False])
print("presync on  tok/s", rates[True])
