"""Hits first changes no output: per-step decode logits with hits first on vs off, and both vs stock
mlx-lm, on a tiny random-weight qwen3_5_moe at banks 6 / 8 / 16 (run from the project root)::

    python benchmarks/hits_first_check.py
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, "tests")
import mlx.core as mx
import mlx_lm
import numpy as np
from flashmoe.convert import convert_checkpoint
from flashmoe.runtime import load
from test_runtime import reference

from flashmoe.fixtures import make_checkpoint

d = Path(tempfile.mkdtemp())
src = make_checkpoint(d / "src", "qwen3_5_moe")
convert_checkpoint(src, d / "out", alignment=16384)
prompt, ref_logits, ref_tokens = reference(src)
for bank in (6, 8, 16):
    res = {}
    for hf in (False, True):
        model, tok = load(str(d / "out"), bank_experts=bank, hits_first=hf)
        logits = np.array(model(mx.array(prompt)[None]).astype(mx.float32))
        # decode-step logits through a cache, 12 steps, greedy
        from mlx_lm.models.cache import make_prompt_cache

        model.flashmoe.store.clear_banks()
        cache = make_prompt_cache(model)
        y = model(mx.array(prompt)[None], cache=cache)[:, -1]
        steps = []
        for _ in range(12):
            t = int(mx.argmax(y, -1).item())
            steps.append((t, np.array(y.astype(mx.float32))))
            y = model(mx.array([[t]]), cache=cache)[:, -1]
        toks = [r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=32)]
        res[hf] = (logits, steps, toks)
        model.flashmoe.close()
    (l0, s0, t0), (l1, s1, t1) = res[False], res[True]
    same_steps = all(
        a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(s0, s1, strict=True)
    )
    print(
        f"bank {bank}: prefill off==stock {np.array_equal(l0, ref_logits)} on==stock {np.array_equal(l1, ref_logits)}; "
        f"decode-step logits on==off {same_steps}; tokens off==stock {t0 == ref_tokens} on==stock {t1 == ref_tokens}",
        flush=True,
    )
