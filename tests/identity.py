"""The bit-identity check shared by the family and quantization-mode tests: a layout streamed
with banks of several sizes against stock mlx-lm on its source checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from flashmoe.layouts import read_index
from flashmoe.runtime import load

# ~45 tokens: prefill routes more tokens x experts than 64 (mlx-lm's sorted gather path) and
# more distinct experts than a small bank holds (grouped prefill).
PROMPT = (
    "Streaming experts from a solid state disk lets a laptop run a model larger than its memory. "
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris."
)
FRACTIONS = (0.0, 0.25, 1.0)  # bank: one token's experts, a quarter, all of them


def _run(model, tokenizer, prompt: list[int], max_tokens: int):
    logits = np.array(model(mx.array(prompt)[None]).astype(mx.float32))
    tokens = [
        r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
    ]
    return logits, tokens


def assert_identical(
    src: Path, out: Path, *, fractions=FRACTIONS, max_tokens: int = 8, **options
) -> None:
    """Prefill logits and greedy tokens of ``out`` equal stock mlx-lm's on ``src``, per bank size."""
    model, tokenizer = mlx_lm.load(str(src))
    prompt = tokenizer.encode(PROMPT)
    ref_logits, ref_tokens = _run(model, tokenizer, prompt, max_tokens)
    assert np.isfinite(ref_logits).all(), "the reference model itself computes non-finite logits"
    index = read_index(out)
    for fraction in fractions:
        slots = max(index.top_k, int(index.num_experts * fraction))
        model, tokenizer = load(str(out), bank_experts=slots, **options)
        logits, tokens = _run(model, tokenizer, prompt, max_tokens)
        assert np.array_equal(logits, ref_logits), f"prefill logits differ (bank of {slots})"
        assert tokens == ref_tokens, f"greedy tokens differ (bank of {slots})"
        model.flashmoe.close()
