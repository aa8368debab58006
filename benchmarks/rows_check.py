"""Which partial-bank decode path changes logits on a backend (meant for the GPU).

First: does a routed expert's row of mlx-lm's SwitchGLU depend on how many experts share the
call? Then: every decode step's logits vs stock mlx-lm with hits first / presync on and off
(a spread token stream, so steps miss). ``python benchmarks/rows_check.py SOURCE LAYOUT BANK
[default]`` (``default``: skip the rows check, the default configuration only).
"""

import sys

import mlx.core as mx
import mlx_lm
import numpy as np
from flashmoe.runtime import load
from mlx_lm.models.cache import make_prompt_cache

src, out, bank = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompt = list(range(3, 19))
rng = np.random.default_rng(0)
offs = rng.integers(1, 1000, 40).tolist()


def steps(model, n=24):
    cache = make_prompt_cache(model)
    y = model(mx.array(prompt)[None], cache=cache)[:, -1]
    got = [np.array(y.astype(mx.float32))]
    for i in range(n):
        t = (int(mx.argmax(y, -1).item()) + offs[i]) % y.shape[-1]
        y = model(mx.array([[t]]), cache=cache)[:, -1]
        got.append(np.array(y.astype(mx.float32)))
    return got


stock, _ = mlx_lm.load(src)
# rows of SwitchGLU: do a routed expert's output rows depend on how many experts are in the call?
layer = stock.layers[0] if hasattr(stock, "layers") else stock.model.layers[0]
glu = layer.mlp.switch_mlp
H = (
    stock.args.hidden_size
    if hasattr(stock.args, "hidden_size")
    else stock.args.text_config["hidden_size"]
)
for trial in range(0 if len(sys.argv) > 4 else 3):
    x = mx.random.normal((1, 1, H), key=mx.random.key(trial)).astype(mx.bfloat16)
    idx = mx.array(rng.choice(glu.gate_proj.weight.shape[0], 10, replace=False).astype(np.uint32))[
        None, None
    ]
    full = glu(x, idx)
    for k in (1, 3, 5, 9):
        part = glu(x, idx[..., :k])
        print(
            f"rows: trial {trial} k={k}: first {k} rows equal the 10-row call's: {bool(mx.array_equal(part, full[..., :k, :]).item())}",
            flush=True,
        )
ref = steps(stock)
del stock
for hf, pre in (
    ((True, True),)
    if len(sys.argv) > 4
    else ((False, False), (True, False), (False, True), (True, True))
):
    model, _ = load(out, bank_experts=bank, hits_first=hf)
    model.flashmoe.store.presync = pre
    got = steps(model)
    eq = [np.array_equal(a, b) for a, b in zip(ref, got, strict=True)]
    s = model.flashmoe.store.stats
    print(
        f"bank {bank} hits_first {hf} presync {pre}: steps equal {sum(eq)}/{len(eq)}, first differing {eq.index(False) if False in eq else None}, misses {s.misses}",
        flush=True,
    )
    model.flashmoe.close()
    del model
