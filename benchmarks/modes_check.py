"""The fp quantization modes streamed vs stock mlx-lm, at banks 16 / 8 / 4 of 16, on whatever device
MLX uses (nvfp4's global scale needs a GPU)::

    python benchmarks/modes_check.py [--hidden N] [MODE ...]   # nvfp4+global nvfp4 mxfp4 mxfp8 (default: all)

Prefill logits are compared NaN-aware (stock itself may produce NaN); the NaN counts are printed.
"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "tests")
import mlx_lm
import numpy as np
from flashmoe.convert import convert_checkpoint
from flashmoe.runtime import load
from identity import PROMPT, _run

from flashmoe.fixtures import make_checkpoint

args = sys.argv[1:]
hidden = 64
if args[:1] == ["--hidden"]:
    hidden, args = int(args[1]), args[2:]
TINY = {
    "hidden": hidden,
    "moe_intermediate": hidden,
    "num_experts": 16,
    "top_k": 2,
    "num_layers": 2,
}
d = Path(tempfile.mkdtemp())
MODES = {
    "nvfp4+global": dict(mode="nvfp4", global_scale=True),
    "nvfp4": dict(mode="nvfp4"),
    "mxfp4": dict(mode="mxfp4"),
    "mxfp8": dict(mode="mxfp8"),
}
for name in args or list(MODES):
    kw = MODES[name]
    try:
        t = time.time()
        src = make_checkpoint(
            d / f"{name}-src", "qwen3_moe", bits=None, group_size=None, **kw, **TINY
        )
        out = d / f"{name}-out"
        convert_checkpoint(src, out, alignment=16384, progress=False)
        model, tok = mlx_lm.load(str(src))
        prompt = tok.encode(PROMPT)
        ref_l, ref_t = _run(model, tok, prompt, 8)
        for bank in (16, 8, 4):
            m, tk = load(str(out), bank_experts=bank)
            logits, tt = _run(m, tk, prompt, 8)
            print(
                f"{name} bank {bank}/16: prefill identical {np.array_equal(logits, ref_l, equal_nan=True)} (NaN: stock {np.isnan(ref_l).sum()}, streamed {np.isnan(logits).sum()}; max diff {np.nanmax(np.abs(logits - ref_l)):.3g}), tokens identical {tt == ref_t}, {time.time() - t:.0f} s",
                flush=True,
            )
            m.flashmoe.close()
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
