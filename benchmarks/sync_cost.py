"""What a sync costs on MLX's GPU backends: a chain of small kernels evaluated with a sync vs handed over.

    python benchmarks/sync_cost.py        # e.g. MLX_USE_CUDA_GRAPHS=0 / MLX_MAX_OPS_PER_BUFFER=N in front

For chains of 2-80 elementwise kernels: the Python time to build the chain, the time to evaluate it and
read one value back (``np.array``: encode, run, wait), and, pipelined (``mx.async_eval`` of each chain,
one sync at the end), the time per chain. The gap between the synced and the pipelined time per kernel
is GPU time that a sync does not overlap with encoding (benchmarks/RESULTS.md, "Early commits").
"""

from __future__ import annotations

import os
import time

import mlx.core as mx
import numpy as np

BASE = mx.zeros((4096,), dtype=mx.float32)


def chain(x: mx.array, n: int) -> mx.array:
    for _ in range(n):
        x = x * 1.0001 + 1.0  # two kernels (nothing is compiled)
    return x


def synced(n: int, iters: int = 300) -> tuple[float, float]:
    """(build us, evaluate + read back us) per chain of 2n kernels."""
    for _ in range(20):
        np.array(chain(BASE, n)[:1])
    build = wait = 0.0
    for _ in range(iters):
        t0 = time.perf_counter()
        y = chain(BASE, n)
        t1 = time.perf_counter()
        np.array(y[:1])
        build, wait = build + t1 - t0, wait + time.perf_counter() - t1
    return build / iters * 1e6, wait / iters * 1e6


def pipelined(n: int, iters: int = 300) -> float:
    """us per chain of 2n kernels, each handed over with async_eval, one sync at the end."""
    y = BASE
    for _ in range(20):
        y = chain(y, n)
        mx.async_eval(y)
    mx.eval(y)
    t0 = time.perf_counter()
    for _ in range(iters):
        y = chain(y, n)
        mx.async_eval(y)
    mx.eval(y)
    return (time.perf_counter() - t0) / iters * 1e6


def main() -> None:
    env = {
        k: os.environ[k]
        for k in ("MLX_USE_CUDA_GRAPHS", "MLX_MAX_OPS_PER_BUFFER")
        if k in os.environ
    }
    print(f"device {mx.default_device()} {env}")
    mx.eval(BASE)
    for _ in range(20):
        np.array(BASE[:1] + 1)
    t0 = time.perf_counter()
    for _ in range(500):
        np.array(BASE[:1] + 1)
    print(f"sync round trip, 1 kernel: {(time.perf_counter() - t0) / 500 * 1e6:.1f} us")
    print("| kernels | build us | eval + sync us | per kernel | pipelined us | per kernel |")
    print("|---|---|---|---|---|---|")
    for n in (1, 10, 40):
        build, wait = synced(n)
        pipe = pipelined(n)
        k = 2 * n
        print(f"| {k} | {build:.1f} | {wait:.1f} | {wait / k:.2f} | {pipe:.1f} | {pipe / k:.2f} |")


if __name__ == "__main__":
    main()
