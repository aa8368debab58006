"""Launching the experts before the router sync (``presync``, the CUDA default) changes no output:
per-step decode logits with presync on vs off, and both vs stock mlx-lm, on a tiny random-weight
qwen3_5_moe at banks 4 / 6 / 8 / 12 of 16 (run from the project root; meant for a GPU, runs
anywhere)::

    python benchmarks/presync_check.py
"""

import tempfile
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from flashmoe.convert import convert_checkpoint
from flashmoe.runtime import load
from flashmoe.runtime.store import ExpertStore
from mlx_lm.models.cache import make_prompt_cache

from flashmoe.fixtures import make_checkpoint

d = Path(tempfile.mkdtemp())
src = make_checkpoint(d / "src", "qwen3_5_moe")
convert_checkpoint(src, d / "out", alignment=16384)
prompt = list(range(3, 19))
confirmed = []
real = ExpertStore.confirm_resident
ExpertStore.confirm_resident = lambda s, *a: confirmed.append(real(s, *a)) or confirmed[-1]


def steps(model, n=16):
    cache = make_prompt_cache(model)
    y = model(mx.array(prompt)[None], cache=cache)[:, -1]
    out = [np.array(y.astype(mx.float32))]
    for _ in range(n):
        t = int(mx.argmax(y, -1).item())
        y = model(mx.array([[t]]), cache=cache)[:, -1]
        out.append(np.array(y.astype(mx.float32)))
    return out


stock, _ = mlx_lm.load(str(src))
ref = steps(stock)
for bank in (4, 6, 8, 12):
    res = {}
    for pre in (True, False):
        model, _ = load(str(d / "out"), bank_experts=bank)
        model.flashmoe.store.presync = pre
        confirmed.clear()
        res[pre] = got = steps(model)
        same = all(np.array_equal(a, b) for a, b in zip(ref, got, strict=True))
        print(
            f"bank {bank} presync {pre}: prefill vs stock {np.array_equal(ref[0], got[0])}, all 17 step logits vs stock {same}; confirm all-resident {confirmed.count(True)} / missing {confirmed.count(False)}",
            flush=True,
        )
        model.flashmoe.close()
    print(
        f"bank {bank}: presync on vs off identical at every step: {all(np.array_equal(a, b) for a, b in zip(res[True], res[False], strict=True))}",
        flush=True,
    )
