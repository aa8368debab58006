"""The first step of a fresh process: say so when it is slow, and time it apart from TTFT.

MLX's CUDA backend compiles its kernels the first time they run (minutes on a fresh machine,
seconds once its cache holds them); Metal and the CPU compile little. Without a word the first
prompt looks hung, and a TTFT measured on it is mostly compile time.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager

SLOW_FIRST_STEP_S = 10.0


def start_slow_notice(after_s: float = SLOW_FIRST_STEP_S, err=sys.stderr) -> threading.Timer:
    """Print one line on ``err`` after ``after_s`` seconds unless ``.cancel()`` is called first."""

    def say() -> None:
        print(
            f"flashmoe: the first step is taking more than {after_s:.0f} s: MLX compiles its "
            "GPU kernels on first use (minutes on a fresh machine, cached afterwards); "
            "not hung",
            file=err,
            flush=True,
        )

    timer = threading.Timer(after_s, say)
    timer.daemon = True
    timer.start()
    return timer


@contextmanager
def slow_step_notice(after_s: float = SLOW_FIRST_STEP_S, err=sys.stderr):
    """``start_slow_notice`` for the duration of a block."""
    timer = start_slow_notice(after_s, err)
    try:
        yield
    finally:
        timer.cancel()


def warm_up(model, prompt: list[int], err=sys.stderr) -> float:
    """Run ``prompt`` and one decode step through ``model`` in a throwaway cache; seconds taken.

    Compiles every kernel that the measured prefill and decode will use. The banks are emptied
    afterwards, so the measured run reads its experts as a fresh process would (the page cache,
    though, is left as the warm-up left it); banks filled at load stay as they are.
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    t0 = time.perf_counter()
    with slow_step_notice(err=err):
        cache = make_prompt_cache(model)
        logits = model(mx.array(prompt)[None], cache=cache)
        token = mx.argmax(logits[:, -1, :], axis=-1)
        # Evaluated apart: in a pipelined model, this step's all-gather must run on every rank
        # before the next step's receive (the next step's router syncs would interleave them).
        mx.eval(token)
        mx.eval(model(token[:, None], cache=cache))
    seconds = time.perf_counter() - t0
    store = model.flashmoe.store
    if not store.filled:
        store.clear_banks()
    return seconds
