"""One rank of tests/test_distributed.py: load a layout pipelined over the launcher's group with
several bank sizes; for each, write the prefill logits, greedy tokens and this rank's streaming
figures to ``OUT.rank<R>.npz`` / ``.json``.

usage: python distributed_rank.py LAYOUT OUT PROMPT_JSON MAX_TOKENS BANK [BANK ...]
"""

from __future__ import annotations

import json
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
from flashmoe.runtime import load


def main(layout: str, out: str, prompt_json: str, max_tokens: str, *banks: str) -> None:
    prompt = json.loads(prompt_json)
    arrays, figures = {}, {}
    for bank in map(int, banks):
        model, tokenizer = load(layout, bank_experts=bank)
        rt = model.flashmoe
        logits = model(mx.array(prompt)[None]).astype(mx.float32)
        arrays[f"logits{bank}"] = np.array(logits)
        arrays[f"tokens{bank}"] = np.array(
            [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, int(max_tokens))]
        )
        stage = rt.plan.stages[rt.rank]
        figures[bank] = {
            "layers": [stage.start, stage.stop],
            "banks": sorted(rt.store.banks),
            "layer_files": len(rt.store._fds),
            "misses": rt.store.stats.misses,
        }
        rt.close()
    np.savez(f"{out}.rank{rt.rank}.npz", **arrays)
    with open(f"{out}.rank{rt.rank}.json", "w") as f:
        json.dump(figures, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
