"""Run one measurement (``bench.worker``) in a fresh subprocess, optionally in a memory cgroup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from .cgroup import MemoryCgroup
from .worker import RESULT_MARK


def run_worker(spec: dict, *, memory_cap: int | None = None, timeout: float = 3600) -> dict:
    """The worker's result dict, plus ``wall_seconds`` and, under a cap, ``cgroup`` figures.

    A worker that dies (e.g. killed by the cgroup's OOM killer) gives ``{"error": ..., "oom": bool}``;
    one that runs past ``timeout`` seconds is killed and gives ``{"error": ..., "timed_out": True}``.
    """
    cmd = [sys.executable, "-m", "flashmoe.bench.worker", json.dumps(spec)]
    group = MemoryCgroup(memory_cap) if memory_cap else None
    t0 = time.perf_counter()
    try:
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                preexec_fn=group.preexec if group else None,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        except subprocess.TimeoutExpired:  # the worker was killed
            return {
                # not a crash: on a fresh GPU machine the first run compiles MLX's kernels
                "error": f"timed out after {timeout:g} s (--timeout; on a fresh GPU machine the "
                "first run compiles MLX's kernels, which can take minutes: run again, or raise "
                "--timeout)",
                "returncode": None,
                "oom": False,
                "timed_out": True,
                "wall_seconds": time.perf_counter() - t0,
            }
        wall = time.perf_counter() - t0
        cg = None
        if group:
            cg = {
                "version": group.version,
                "limit_bytes": group.limit,
                "peak_bytes": group.peak_bytes(),
                "oom_kills": group.oom_kills(),
            }
    finally:
        if group:
            group.remove()
    out = proc.stdout
    if proc.returncode == 0 and RESULT_MARK in out:
        result = json.loads(out[out.rindex(RESULT_MARK) + len(RESULT_MARK) :].splitlines()[0])
    else:
        killed = proc.returncode < 0 and -proc.returncode == signal.SIGKILL
        oom = bool(cg and (cg["oom_kills"] or killed))
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        result = {
            "error": "killed by the memory cgroup (out of memory)" if oom else tail[0],
            "returncode": proc.returncode,
            "oom": oom,
        }
    result["wall_seconds"] = wall
    if cg:
        result["cgroup"] = cg
    return result
