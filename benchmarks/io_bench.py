"""``python benchmarks/io_bench.py``: expert-read throughput of the native and Python readers vs fio and memcpy.

A synthetic layer file (>= 8 GB) is read like the runtime reads it: per step, K experts at random record
offsets, each split into ``n`` chunks by the layout's split plan, all chunks one batch, one wait.

- cold: page cache dropped (POSIX_FADV_DONTNEED) and checked with mincore before every configuration;
  no record is read twice within a configuration. fio runs at the same block size (the chunk size) and
  queue depth (min(threads, K x n)) with psync jobs on disjoint file regions.
- warm: a working set of records is read once and its residency checked with mincore right before every
  configuration (a reclaim daemon pages out idle cache here); compared with a numpy copy of the same
  bytes from RAM into the same slot buffers.
- per-read overhead: many 4 KiB warm reads in one batch, minus the same preadv calls in a plain C loop.
- GIL: the same warm reads while a pure-Python thread spins beside them.

Writes a JSON file (printed at the end) and a plain-text table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from flashmoe.bench.pagecache import resident_fraction
from flashmoe.layouts.plan import record_size, split_plan
from flashmoe.runtime.reader import (
    advise_dontneed,
    make_reader,
    open_for_reading,
    split_requests,
)

from flashmoe.fileio import commit

GEOMETRIES = {  # name -> (expert_bytes, K)
    "397B": (7_077_888, 10),
    "35B": (1_769_472, 8),
}
ALIGNMENT = 16384
SPLITS = (1, 2, 3, 4, 5, 8)
DEFAULT_FILE = "/tmp/flashmoe-io-bench.bin"
DEFAULT_SIZE = 1200 * 7_077_888  # 8.49 GB: 1200 397B records = 4800 35B records

# ---------------------------------------------------------------------------------- page cache


def drop_cache(fd: int) -> float:
    """Drop the file from the page cache; return the resident fraction left (checked with mincore)."""
    advise_dontneed(fd)
    return resident_fraction(fd)


def ensure_file(path: str, size: int) -> None:
    """Create ``path`` with ``size`` bytes of incompressible data unless it already has that size."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    free = shutil.disk_usage(os.path.dirname(path) or ".").free
    if free < size + (4 << 30):
        raise SystemExit(f"{path}: need {size / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    print(f"writing {size / 1e9:.2f} GB to {path} ...", flush=True)
    block = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    fd = os.open(path + ".partial", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with open(fd, "wb", closefd=False) as f:
        for i, pos in enumerate(range(0, size, block.size)):
            block[:8] = np.frombuffer(np.int64(i).tobytes(), dtype=np.uint8)  # no two blocks equal
            f.write(memoryview(block)[: min(block.size, size - pos)])
    commit(fd, path + ".partial", path)


# ---------------------------------------------------------------------------------- measurements


@dataclass
class Row:
    mode: str  # cold | warm | cold-direct | warm-gil
    geometry: str
    reader: str
    split: int
    threads: int
    steps: int
    ms_per_step: float
    gb_s: float
    bs: int = 0  # fio-equivalent block size (the largest chunk)
    qd: int = 0  # fio-equivalent queue depth
    ref_gb_s: float = 0.0  # fio (cold) or memcpy (warm) or quiet (gil)
    ratio: float = 0.0
    resident_before: float = 0.0


def bank(expert: int, k: int, direct: bool = False) -> tuple[np.ndarray, list[memoryview]]:
    """K slot buffers, prefaulted (like a runtime slot bank), page-aligned for O_DIRECT."""
    rec = record_size(expert, ALIGNMENT)
    raw = np.ones(k * rec + 4096, dtype=np.uint8)
    base = -raw.ctypes.data % 4096
    slots = raw[base : base + k * rec].reshape(k, rec)
    return slots, [memoryview(slots[i])[: rec if direct else expert] for i in range(k)]


def step_requests(fd, path, expert, records, slots, plan) -> list:
    rec = record_size(expert, ALIGNMENT)
    return [
        r
        for e, s in zip(records, slots, strict=True)
        for r in split_requests(fd, int(e) * rec, (s,), plan, path)
    ]


def run_steps(reader, fd, path, expert, k, split, steps, rng, pool, direct=False, depth=1) -> float:
    """Read ``steps`` steps of K experts drawn from ``pool`` (consumed without replacement if it is a
    list); return seconds. ``depth`` 2 keeps two steps in flight (two banks): submit step i + 1, then
    wait for step i, as a pipelined runtime would."""
    banks = [bank(expert, k, direct)[1] for _ in range(depth)]
    plan = split_plan(expert, ALIGNMENT, split)
    batches = []
    for i in range(steps):
        if isinstance(pool, list):
            recs = [pool.pop() for _ in range(k)]
        else:
            recs = rng.choice(pool, size=k, replace=False)
        batches.append(step_requests(fd, path, expert, recs, banks[i % depth], plan))
    t0 = time.perf_counter()
    if depth == 1:
        for b in batches:
            reader.read(b)
    else:
        pending = []
        for b in batches:
            pending.append(reader.submit(b))
            if len(pending) >= depth:
                pending.pop(0).wait()
        for p in pending:
            p.wait()
    return time.perf_counter() - t0


def fio(path: str, size: int, bs: int, qd: int, runtime: float, direct: bool = False) -> float:
    """fio random-read GB/s: ``qd`` psync jobs on disjoint regions, ``bs`` blocks, cold start."""
    region = size // qd // bs * bs
    cmd = [
        "fio", "--name=r", f"--filename={path}", "--rw=randread", f"--bs={bs}", "--ioengine=psync",
        f"--numjobs={qd}", f"--size={region}", f"--offset_increment={region}", "--group_reporting",
        "--time_based", f"--runtime={runtime}", "--invalidate=1", f"--direct={int(direct)}",
        "--output-format=json",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    return job["bw_bytes"] / 1e9


def memcpy_gb_s(expert: int, k: int, steps: int, src: np.ndarray) -> float:
    """numpy copy of K records per step from a RAM array into the slot buffers (one thread)."""
    slots, _ = bank(expert, k)
    nrec = src.size // expert
    rng = np.random.default_rng(1)
    picks = [rng.choice(nrec, size=k, replace=False) for _ in range(steps)]
    t0 = time.perf_counter()
    for recs in picks:
        for i, e in enumerate(recs):
            np.copyto(slots[i, :expert], src[e * expert : (e + 1) * expert])
    return steps * k * expert / (time.perf_counter() - t0) / 1e9


def warm_up(fd: int, ranges: list[tuple[int, int]]) -> float:
    """Read ``ranges`` into the page cache; return the resident fraction of them (mincore)."""
    buf = bytearray(max(n for _, n in ranges))
    for off, n in ranges:
        os.preadv(fd, [memoryview(buf)[:n]], off)
    return min(resident_fraction(fd, off, n) for off, n in ranges)


def per_read_overhead(fd: int, path: str, n_reads: int, out: dict) -> None:
    """µs per 4 KiB warm read: native pool (1 thread, one batch) vs a plain C preadv loop vs Python."""
    from flashmoe.runtime import native_reader

    span = 64 << 20
    warm_up(fd, [(0, span)])
    rng = np.random.default_rng(2)
    offs = (rng.integers(0, span // 4096, n_reads) * 4096).astype(np.int64)
    buf = bytearray(4096)
    # plain loop: the syscall cost alone (GIL released, no pool)
    native_reader.preadv_loop(fd, buf, offs[:1000].tobytes())
    t0 = time.perf_counter()
    native_reader.preadv_loop(fd, buf, offs.tobytes())
    loop_us = (time.perf_counter() - t0) / n_reads * 1e6
    res = {"reads": n_reads, "resident": resident_fraction(fd, 0, span), "loop_us": loop_us}
    bufs = [bytearray(4096) for _ in range(64)]
    for kind, threads in (("native", 1), ("native", 2), ("python", 1), ("python", 2)):
        n = n_reads if kind == "native" else n_reads // 4
        reqs = [(fd, int(o), (bufs[i % 64],), path) for i, o in enumerate(offs[:n])]
        with make_reader(kind, threads) as r:
            if kind == "python":
                from flashmoe.runtime.reader import ReadRequest

                reqs = [ReadRequest(*q) for q in reqs]
            r.read(reqs[:100])
            t0 = time.perf_counter()
            r.read(reqs)
            dt = (time.perf_counter() - t0) / n * 1e6
        res[f"{kind}_t{threads}_us"] = dt
    # one-read batches: the fixed cost of submit + wake + wait
    with make_reader("native", 1) as r:
        one = [(fd, 0, (buf,), path)]
        for _ in range(100):
            r.read(one)
        t0 = time.perf_counter()
        for _ in range(2000):
            r.read(one)
        res["native_batch_of_1_us"] = (time.perf_counter() - t0) / 2000 * 1e6
    res["overhead_us"] = res["native_t1_us"] - loop_us
    out.update(res)


class Spinner:
    """A pure-Python thread that holds the GIL whenever the interpreter lets it."""

    def __init__(self):
        self.stop = False
        self.count = 0
        self.t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop:
            self.count += 1

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()


class SpinnerProcess:
    """A busy process: takes a core like the Spinner thread, without touching our GIL."""

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs (colleagues share the 2 cores: the minimum is the least noisy)."""
    return min(fn() for _ in range(repeats))


def gil_rows(args, g, fd, path, expert, k, nrec, rng, work, ranges) -> list[Row]:
    """Split 4, warm and cold: quiet vs a GIL-holding Python thread vs a busy process (CPU only),
    one step at a time (``seq``) and with two steps in flight (``pipe``)."""
    rows = []
    split = 4
    nb = args.warm_steps * k * expert
    cold_steps = max(2, int(args.cold_bytes // 2 // (k * expert)))
    for kind, threads in (("native", 2), ("native", 8), ("python", 2), ("python", 8)):
        with make_reader(kind, threads) as r:
            for depth in (1, 2):
                tag = "seq" if depth == 1 else "pipe"

                def warm(r=r, depth=depth):
                    warm_up(fd, ranges)
                    return run_steps(
                        r, fd, path, expert, k, split, args.warm_steps, rng, work, depth=depth
                    )

                def cold(r=r, depth=depth):
                    drop_cache(fd)
                    pool = [int(x) for x in rng.permutation(nrec)[: cold_steps * k]]
                    return run_steps(
                        r, fd, path, expert, k, split, cold_steps, rng, pool, depth=depth
                    )

                for mode, fn, n in (("warm", warm, nb), ("cold", cold, cold_steps * k * expert)):
                    steps = args.warm_steps if mode == "warm" else cold_steps
                    reps = args.repeats if mode == "warm" else 1
                    fn()
                    quiet = best(fn, reps)
                    for what, ctx in (("+GIL thread", Spinner), ("+busy process", SpinnerProcess)):
                        with ctx():
                            dt = best(fn, reps)
                        rows.append(
                            Row(
                                f"{mode} {tag} {what}",
                                g,
                                kind,
                                split,
                                threads,
                                steps,
                                dt / steps * 1e3,
                                n / dt / 1e9,
                                0,
                                0,
                                n / quiet / 1e9,
                                quiet / dt,
                                1.0 if mode == "warm" else 0.0,
                            )  # fmt: skip
                        )
                        print_row(rows[-1])
    return rows


# ---------------------------------------------------------------------------------- the run


def grid(full: bool, threads_opt: list[int] | None) -> list[tuple[int, int]]:
    if full:
        return [(s, t) for s in SPLITS for t in range(1, 17)]
    if threads_opt:
        return [(s, t) for s in SPLITS for t in threads_opt]
    return [(s, t) for s in SPLITS for t in (1, 8)] + [(4, t) for t in (2, 4, 16)]


def machine() -> str:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--file", default=DEFAULT_FILE, help="synthetic layer file (reused if the size matches)"
    )
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="file size in bytes (>= 8 GB)")
    p.add_argument(
        "--keep", action="store_true", help="keep the file afterwards (default: delete it)"
    )
    p.add_argument("--full", action="store_true", help="every split x threads 1..16 (slow)")
    p.add_argument(
        "--threads", type=int, nargs="+", help="thread counts (default: 1 8, + 2 4 16 at split 4)"
    )
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), nargs="+", default=["397B", "35B"])
    p.add_argument(
        "--cold-bytes", type=float, default=0.5e9, help="bytes read per cold configuration"
    )
    p.add_argument("--warm-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="warm runs per configuration (best kept)")
    p.add_argument("--fio-runtime", type=float, default=1.5, help="seconds per fio run (0: no fio)")
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["cold", "warm", "overhead", "gil", "direct"]
    )
    p.add_argument("--json", help="output JSON path (default benchmarks/out/io-<time>.json)")


def run(args: argparse.Namespace) -> int:
    t_start = time.time()
    ensure_file(args.file, args.size)
    path, size = args.file, args.size
    fd = open_for_reading(path)
    result: dict = {
        "command": "python benchmarks/io_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "file": path,
        "size": size,
        "rows": [],
        "fio": {},
    }
    rows: list[Row] = []
    fio_cache: dict[tuple, float] = {}
    rng = np.random.default_rng(0)
    configs = grid(args.full, args.threads)
    have_fio = args.fio_runtime > 0 and shutil.which("fio") is not None
    if not have_fio and args.fio_runtime > 0:
        print("fio not found (apt-get install fio): no fio comparison", file=sys.stderr)

    def fio_ref(bs, qd, direct=False):
        key = (bs, qd, direct)
        if have_fio and key not in fio_cache:
            fio_cache[key] = fio(path, size, bs, qd, args.fio_runtime, direct)
            result["fio"][f"bs={bs} qd={qd} direct={int(direct)}"] = fio_cache[key]
        return fio_cache.get(key, 0.0)

    try:
        for g in args.geometry:
            expert, k = GEOMETRIES[g]
            nrec = size // record_size(expert, ALIGNMENT)
            for split, threads in configs:
                plan = split_plan(expert, ALIGNMENT, split)
                bs = max(b - a for a, b in plan)
                qd = min(threads, k * len(plan))
                if "cold" not in args.skip:
                    steps = max(2, int(args.cold_bytes // (k * expert)))
                    for kind in ("native",) + (("python",) if (split, threads) == (4, 8) else ()):
                        left = drop_cache(fd)
                        pool = [int(x) for x in rng.permutation(nrec)[: steps * k]]
                        with make_reader(kind, threads) as r:
                            dt = run_steps(r, fd, path, expert, k, split, steps, rng, pool)
                        gbs = steps * k * expert / dt / 1e9
                        ref = fio_ref(bs, qd)
                        rows.append(
                            Row(
                                "cold",
                                g,
                                kind,
                                split,
                                threads,
                                steps,
                                dt / steps * 1e3,
                                gbs,
                                bs,
                                qd,
                                ref,
                                gbs / ref if ref else 0.0,
                                left,
                            )  # fmt: skip
                        )
                        print_row(rows[-1])
            if "direct" not in args.skip and hasattr(os, "O_DIRECT"):
                split, threads = 4, 8
                plan = split_plan(expert, ALIGNMENT, split)
                bs, qd = max(b - a for a, b in plan), min(threads, k * split)
                steps = max(2, int(args.cold_bytes // (k * expert)))
                dfd = open_for_reading(path, direct=True)
                try:
                    left = drop_cache(fd)
                    pool = [int(x) for x in rng.permutation(nrec)[: steps * k]]
                    with make_reader("native", threads) as r:
                        dt = run_steps(
                            r, dfd, path, expert, k, split, steps, rng, pool, direct=True
                        )
                finally:
                    os.close(dfd)
                gbs = steps * k * record_size(expert, ALIGNMENT) / dt / 1e9
                ref = fio_ref(bs, qd, direct=True)
                rows.append(
                    Row(
                        "cold-direct",
                        g,
                        "native",
                        split,
                        threads,
                        steps,
                        dt / steps * 1e3,
                        gbs,
                        bs,
                        qd,
                        ref,
                        gbs / ref if ref else 0.0,
                        left,
                    )  # fmt: skip
                )
                print_row(rows[-1])
            if "warm" not in args.skip or "gil" not in args.skip:
                ws = 48 if g == "397B" else 160  # ~340 / 283 MB working set
                work = np.sort(rng.choice(nrec, size=ws, replace=False))
                ranges = [(int(e) * expert, expert) for e in work]
                src = np.random.default_rng(3).integers(0, 256, ws * expert, dtype=np.uint8)
            if "warm" not in args.skip:
                for split, threads in configs:
                    for kind in ("native",) + (("python",) if (split, threads) == (4, 8) else ()):
                        nbytes = args.warm_steps * k * expert
                        mem = max(
                            memcpy_gb_s(expert, k, args.warm_steps, src)
                            for _ in range(args.repeats)
                        )
                        res = warm_up(fd, ranges)
                        with make_reader(kind, threads) as r:
                            run_steps(r, fd, path, expert, k, split, 3, rng, work)
                            dt = min(
                                run_steps(r, fd, path, expert, k, split, args.warm_steps, rng, work)
                                for _ in range(args.repeats)
                            )
                        gbs = nbytes / dt / 1e9
                        rows.append(
                            Row(
                                "warm",
                                g,
                                kind,
                                split,
                                threads,
                                args.warm_steps,
                                dt / args.warm_steps * 1e3,
                                gbs,
                                0,
                                min(threads, k * split),
                                mem,
                                gbs / mem,
                                res,
                            )  # fmt: skip
                        )
                        print_row(rows[-1])
            if "gil" not in args.skip:
                rows += gil_rows(args, g, fd, path, expert, k, nrec, rng, work, ranges)
        if "overhead" not in args.skip:
            ov: dict = {}
            per_read_overhead(fd, path, 20000, ov)
            result["per_read"] = ov
            print("per-read (4 KiB warm): " + ", ".join(f"{k}={v:.3g}" for k, v in ov.items()))
    finally:
        os.close(fd)
        if not args.keep:
            os.unlink(path)
    result["rows"] = [asdict(r) for r in rows]
    result["seconds"] = time.time() - t_start
    out = (
        Path(args.json)
        if args.json
        else Path(__file__).parent / "out" / time.strftime("io-%Y%m%d-%H%M%S.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{table(rows)}\nJSON: {out}")
    return 0


HEADER = "| mode | geometry | reader | split | threads | ms/step | GB/s | ref GB/s | ratio |"


def print_row(r: Row) -> None:
    print(fmt_row(r), flush=True)


def fmt_row(r: Row) -> str:
    return (
        f"| {r.mode} | {r.geometry} | {r.reader} | {r.split} | {r.threads} | {r.ms_per_step:.1f} | "
        f"{r.gb_s:.2f} | {r.ref_gb_s:.2f} | {r.ratio:.2f} |"
    )


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER, "|---|---|---|---|---|---|---|---|---|"] + [fmt_row(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/io_bench.py", description=__doc__.splitlines()[0]
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
