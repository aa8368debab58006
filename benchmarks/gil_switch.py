"""Does a lower ``sys.setswitchinterval`` win back the GIL handoff after a native batch wait?

Warm 35B-sized expert reads (K=8 x 1,769,472 B, split 4, native reader, 2 threads), one step at a
time, quiet vs with a pure-Python spinning thread, for several switch intervals.

    python benchmarks/gil_switch.py [FILE]
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
from flashmoe.layouts.plan import split_plan
from flashmoe.runtime.reader import ReadRequest, make_reader, open_for_reading, split_buffers

EXPERT, EXPERTS, K = 1_769_472, 256, 8


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0].startswith("-"):  # not a FILE: never write 450 MB to "--help"
        print(__doc__)
        return 0 if argv[0] in ("-h", "--help") else 2
    path = argv[0] if argv else "/tmp/flashmoe-gil-switch.bin"
    if not os.path.exists(path) or os.path.getsize(path) != EXPERT * EXPERTS:
        with open(path, "wb") as f:
            for _ in range(EXPERTS):
                f.write(os.urandom(EXPERT))
    fd = open_for_reading(path)
    with open(path, "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass
    buffers = [bytearray(EXPERT) for _ in range(K)]
    plan = split_plan(EXPERT, 16384, 4)
    chunks = [split_buffers([memoryview(b)], plan) for b in buffers]
    rng = np.random.default_rng(0)

    def steps(reader, n: int = 200) -> float:
        t = time.perf_counter()
        for _ in range(n):
            ids = rng.choice(EXPERTS, K, replace=False)
            reader.read(
                [
                    ReadRequest(fd, int(e) * EXPERT + start, views, path)
                    for i, e in enumerate(ids)
                    for start, views in chunks[i]
                ]
            )
        return (time.perf_counter() - t) / n

    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    default = sys.getswitchinterval()
    print("| switch interval | quiet ms/step | +GIL thread ms/step | ratio |")
    print("|---|---|---|---|")
    for interval in (default, 0.0005, 0.0001):
        sys.setswitchinterval(interval)
        with make_reader("native", 2) as reader:
            steps(reader, 20)
            quiet = min(steps(reader) for _ in range(3))
            stop.clear()
            spinner = threading.Thread(target=spin)
            spinner.start()
            busy = min(steps(reader) for _ in range(3))
            stop.set()
            spinner.join()
        print(
            f"| {interval * 1e3:g} ms | {quiet * 1e3:.2f} | {busy * 1e3:.2f} | {quiet / busy:.2f} |"
        )
    sys.setswitchinterval(default)
    os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
