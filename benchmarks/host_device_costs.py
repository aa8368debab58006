"""What the small host <-> device steps of a decode step cost on MLX's GPU backend, in microseconds:

    python benchmarks/host_device_costs.py [--rounds 300]

Each case runs ``--rounds`` times after a warm-up and prints its mean time. The cases are the
pieces a partial bank's MoE layer is made of: a small array made from numpy (the bank's device
table, slot ids), a commit (``mx.async_eval``) of one or ten small ops, a router (a 512-expert
gate on one token, top-10) read back with ``np.array`` or waited for with ``mx.eval``, and each of
those with a large kernel queued behind (or running during) it, which shows whether the host step
waits for the GPU's unrelated work. On CUDA also the router's ids copied to pinned memory by the
driver (``cuMemcpyDtoHAsync``) instead of read by the CPU, with and without a kernel behind. Runs on any backend (the CPU's figures
say little: there is no device to wait for).
"""

from __future__ import annotations

import argparse
import ctypes
import time

import mlx.core as mx
import numpy as np
from flashmoe.metal import cuda

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--rounds", type=int, default=300)
args = p.parse_args()

kept: list[mx.array] = []


def case(label: str, fn, rounds: int | None = None) -> None:
    rounds = rounds or args.rounds
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    print(f"{label:66s} {(time.perf_counter() - t0) / rounds * 1e6:8.1f} us", flush=True)
    mx.eval(kept)
    kept.clear()


print(f"device: {mx.default_device()}")
table = np.arange(512, dtype=np.uint32)
ids = mx.array(np.arange(10, dtype=np.uint32).reshape(1, 1, 10))
x = mx.random.normal((1, 4096))
w = mx.random.normal((512, 4096)).astype(mx.bfloat16)
h = mx.random.normal((1, 1, 4096)).astype(mx.bfloat16)
on_cpu = mx.default_device() == mx.cpu
big = mx.random.normal((2, 1024, 1024) if on_cpu else (8, 4096, 4096))  # 512 MB on a GPU
running: list[mx.array | None] = [None]  # the last large kernel's output (one at a time)
mx.eval(ids, x, w, h, big)


def router() -> mx.array:
    return mx.argpartition(h @ w.T, kth=-10, axis=-1)[..., -10:]


def behind() -> None:
    """Queue a large kernel (~0.3 ms on an H200); the previous one's output is released."""
    running[0] = big * 1.5
    mx.async_eval(running[0])


case("mx.array(numpy uint32[512])", lambda: mx.array(table))
case("mx.array(numpy uint32[512]), a large kernel queued", lambda: (behind(), mx.array(table)), 50)
case(
    "mx.array(...)[ids] committed",
    lambda: kept.append(mx.array(table)[ids]) or mx.async_eval(kept[-1]),
)
case("async_eval of one small op", lambda: kept.append(x * 2.0) or mx.async_eval(kept[-1]))


def ten_ops() -> None:
    y = x
    for _ in range(10):
        y = y * 1.001
    kept.append(y)
    mx.async_eval(y)


case("async_eval of ten small ops", ten_ops)
case("router -> np.array (the router sync)", lambda: np.array(router()))
case("router -> mx.eval (the wait, no host read)", lambda: mx.eval(router()))


def read_behind() -> None:
    r = router()
    mx.async_eval(r)
    behind()
    np.array(r)


def wait_behind() -> None:
    r = router()
    mx.async_eval(r)
    behind()
    mx.eval(r)


case("router, a large kernel queued behind it; np.array(router)", read_behind, 50)
case("router, a large kernel queued behind it; mx.eval(router)", wait_behind, 50)
case("the large kernel alone, evaluated", lambda: mx.eval(big * 1.5), 50)

found = cuda.detect(mx.zeros((4,)))
if found is not None:
    dev = found[0]
    pinned = dev.pinned(4096)
    host, pinned_at = np.frombuffer(pinned, dtype=np.uint32), cuda.address(pinned)
    copy = dev._cu.cuMemcpyDtoHAsync_v2
    copy.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]

    def dma() -> np.ndarray:
        r = router()
        mx.eval(r)
        dev.bind()
        copy(pinned_at, cuda.address(memoryview(r)), r.nbytes, dev._stream)
        dev.synchronize()
        return host[: r.size].copy()

    case("router -> mx.eval -> cuMemcpyDtoHAsync to pinned + stream sync", dma)

    def dma_behind() -> np.ndarray:
        r = router()
        mx.async_eval(r)
        behind()
        mx.eval(r)
        dev.bind()
        copy(pinned_at, cuda.address(memoryview(r)), r.nbytes, dev._stream)
        dev.synchronize()
        return host[: r.size].copy()

    case("router, a large kernel queued behind it; mx.eval + DMA copy", dma_behind, 50)
    r = router()
    print("copied ids equal np.array's:", bool(np.array_equal(dma(), np.array(r).ravel())))
