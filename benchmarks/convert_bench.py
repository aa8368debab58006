"""Benchmark flashmoe-convert against `cp` of the same shards on the same disk.

Builds a synthetic checkpoint with Qwen3.5-35B-A3B expert geometry (hidden 2048, 256 experts of
moe_intermediate 512, affine 4-bit group 64, bf16 scales; 10 layers = 4.5 GB of experts), written
directly as mlx-community-style safetensors shards (unsorted, unaligned, random bytes, bounded
memory). Then, with the page cache dropped before each run: `cp` of the shards (+ `sync`, since the
converter fsyncs), and the conversion in a fresh process (its peak RSS from /proc). Prints a table
and writes JSON.

    python benchmarks/convert_bench.py --dir /work/bench-tmp --layers 10 --json benchmarks/out/convert.json

``--hub``: the same checkpoint served by the Hub emulator (tests/hub_emulator.py, in this process),
and rounds of: the download alone (``hf_hub_download`` of every shard in turn, the converter's
transfers, in a fresh process; kept, and each deleted once fetched as the converter releases it:
then its pages are never written back, so that is the pure transfer) and ``flashmoe-convert ORG/NAME`` (streamed) for each
``--variant LABEL=PYTHON`` (an interpreter with flashmoe installed: a checkout's venv), alternated.

    python benchmarks/convert_bench.py --hub --dir /work/bench-tmp --layers 8 \
        --variant before=/tmp/flashmoe-main/.venv/bin/python --variant after=.venv/bin/python

``--plan``: ``flashmoe-convert --plan ORG/NAME`` (a fresh process, nothing cached) of a repo of
``--shards`` shards on the emulator, each its real header and a hole (no data written), with
``--latency-ms`` added to every request; and, in one process, the header fetch alone and
``plan_layout``.

    python benchmarks/convert_bench.py --plan --layers 61 --shards 100 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from flashmoe.bench.pagecache import drop, files_of

HIDDEN, EXPERTS, MOE_I, TOP_K, VOCAB = 2048, 256, 512, 8, 248320
HEADS, KV_HEADS, HEAD_DIM = 16, 2, 256
LIN_K_HEADS, LIN_V_HEADS, LIN_DIM = 16, 32, 128


def config(layers: int) -> dict:
    text = {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "num_experts": EXPERTS,
        "num_experts_per_tok": TOP_K,
        "moe_intermediate_size": MOE_I,
        "shared_expert_intermediate_size": MOE_I,
        "full_attention_interval": 4,
        "linear_num_key_heads": LIN_K_HEADS,
        "linear_num_value_heads": LIN_V_HEADS,
        "linear_key_head_dim": LIN_DIM,
        "linear_value_head_dim": LIN_DIM,
        "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    }
    quant: dict = {"group_size": 64, "bits": 4, "mode": "affine"}
    for i in range(layers):
        for m in ("mlp.gate", "mlp.shared_expert_gate"):
            quant[f"language_model.model.layers.{i}.{m}"] = {"group_size": 64, "bits": 8}
    return {
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "quantization": quant,
        "quantization_config": quant,
    }


def quantized(name: str, out_dim: int, in_dim: int, bits: int = 4, lead: tuple = ()) -> list:
    return [
        (f"{name}.weight", "U32", [*lead, out_dim, in_dim * bits // 32]),
        (f"{name}.scales", "BF16", [*lead, out_dim, in_dim // 64]),
        (f"{name}.biases", "BF16", [*lead, out_dim, in_dim // 64]),
    ]


def tensors(layers: int) -> list[tuple[str, str, list[int]]]:
    """Key, dtype and shape of every tensor, in mlx-lm's parameter order."""
    p = "language_model.model"
    out = quantized(f"{p}.embed_tokens", VOCAB, HIDDEN)
    for i in range(layers):
        L = f"{p}.layers.{i}"
        out.append((f"{L}.input_layernorm.weight", "BF16", [HIDDEN]))
        if (i + 1) % 4 == 0:
            out += quantized(f"{L}.self_attn.q_proj", HEADS * HEAD_DIM * 2, HIDDEN)
            out += quantized(f"{L}.self_attn.k_proj", KV_HEADS * HEAD_DIM, HIDDEN)
            out += quantized(f"{L}.self_attn.v_proj", KV_HEADS * HEAD_DIM, HIDDEN)
            out += quantized(f"{L}.self_attn.o_proj", HIDDEN, HEADS * HEAD_DIM)
            out.append((f"{L}.self_attn.q_norm.weight", "BF16", [HEAD_DIM]))
            out.append((f"{L}.self_attn.k_norm.weight", "BF16", [HEAD_DIM]))
        else:
            qkv = 2 * LIN_K_HEADS * LIN_DIM + LIN_V_HEADS * LIN_DIM
            out += quantized(f"{L}.linear_attn.in_proj_qkv", qkv, HIDDEN)
            out += quantized(f"{L}.linear_attn.in_proj_z", LIN_V_HEADS * LIN_DIM, HIDDEN)
            out += quantized(f"{L}.linear_attn.out_proj", HIDDEN, LIN_V_HEADS * LIN_DIM)
            out.append((f"{L}.linear_attn.A_log", "F32", [LIN_V_HEADS]))
            out += quantized(f"{L}.linear_attn.in_proj_a", LIN_V_HEADS, HIDDEN)
            out += quantized(f"{L}.linear_attn.in_proj_b", LIN_V_HEADS, HIDDEN)
            out.append((f"{L}.linear_attn.dt_bias", "BF16", [LIN_V_HEADS]))
            out.append((f"{L}.linear_attn.norm.weight", "BF16", [LIN_DIM]))
            out.append((f"{L}.linear_attn.conv1d.weight", "BF16", [qkv, 4, 1]))
        out += quantized(f"{L}.mlp.gate", EXPERTS, HIDDEN, bits=8)
        for proj, (o, i_) in (
            ("gate_proj", (MOE_I, HIDDEN)),
            ("up_proj", (MOE_I, HIDDEN)),
            ("down_proj", (HIDDEN, MOE_I)),
        ):
            out += quantized(f"{L}.mlp.switch_mlp.{proj}", o, i_, lead=(EXPERTS,))
            out += quantized(f"{L}.mlp.shared_expert.{proj}", o, i_)
        out += quantized(f"{L}.mlp.shared_expert_gate", 1, HIDDEN, bits=8)
        out.append((f"{L}.post_attention_layernorm.weight", "BF16", [HIDDEN]))
    out.append((f"{p}.norm.weight", "BF16", [HIDDEN]))
    out += quantized("language_model.lm_head", VOCAB, HIDDEN)
    return out


SIZES = {"U32": 4, "BF16": 2, "F32": 4}


def nbytes(dtype: str, shape: list[int]) -> int:
    return int(np.prod(shape)) * SIZES[dtype]


def pack(entries: list, shard_bytes: int) -> list[list]:
    """Greedy in parameter order, like mlx-lm: a new shard when the next tensor would overflow."""
    shards: list[list] = []
    size = 0
    for e in entries:
        if not shards or size + nbytes(e[1], e[2]) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes(e[1], e[2])
    return shards


def shard_bytes_for(layers: int, count: int) -> int:
    """The largest shard size that packs ``layers`` layers into ``count`` shards or more."""
    entries = tensors(layers)
    lo, hi = max(nbytes(e[1], e[2]) for e in entries), sum(nbytes(e[1], e[2]) for e in entries)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(pack(entries, mid)) >= count else (lo, mid - 1)
    return lo


def write_checkpoint(path: Path, layers: int, shard_bytes: int, sparse: bool = False) -> int:
    """Write the shards (greedy in parameter order, like mlx-lm) with random bytes, or, ``sparse``,
    each its real header and a hole of the data's size; return their size."""
    path.mkdir(parents=True, exist_ok=True)
    shards = pack(tensors(layers), shard_bytes)
    noise = (
        b"" if sparse else np.random.default_rng(0).integers(0, 256, 64 << 20, np.uint8).tobytes()
    )
    weight_map, total, cursor = {}, 0, 0
    for s, group in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for key, dtype, shape in group:
            n = nbytes(dtype, shape)
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[key] = name
        raw = json.dumps(header).encode()  # not padded: data starts at an odd offset, as in mlx-lm
        with open(path / name, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            left = 0 if sparse else offset
            if sparse:
                f.truncate(8 + len(raw) + offset)
            while left:
                n = min(left, len(noise) - cursor, 16 << 20)
                f.write(noise[cursor : cursor + n])
                cursor = (cursor + n) % (
                    len(noise) - 1
                )  # drift so that tensors don't repeat exactly
                left -= n
        total += os.path.getsize(path / name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config(layers), indent=2))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return total


def drop_caches(*dirs: Path) -> str:
    """Evict the benchmark's own files from the page cache (not the whole machine's)."""
    os.sync()
    left = drop(files_of(*dirs))
    return f"POSIX_FADV_DONTNEED on the benchmark's files ({left:.1%} still resident)"


def time_cp(src: Path, dst: Path, sync: bool) -> float:
    shards = sorted(str(p) for p in src.glob("*.safetensors"))
    dst.mkdir()
    drop_caches(src)
    t = time.perf_counter()
    subprocess.run(["cp", *shards, str(dst)], check=True)
    if sync:
        os.sync()
    elapsed = time.perf_counter() - t
    shutil.rmtree(dst)
    return elapsed


CONVERT = """
import json, sys, time
from flashmoe.convert import convert_checkpoint
t = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), verify=sys.argv[4] == "1", progress=False)
elapsed = time.perf_counter() - t
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": elapsed, "peak_rss_kb": int(hwm.split()[1])}))
"""


def time_convert(src: Path, dst: Path, workers: int, verify: bool = False) -> dict:
    drop_caches(src)
    r = subprocess.run(
        [sys.executable, "-c", CONVERT, str(src), str(dst), str(workers), "1" if verify else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(dst)
    return result


HUB_REPO = "bench/synthetic-moe"

DOWNLOAD = """
import json, os, resource, sys, time
from huggingface_hub import hf_hub_download
t = time.perf_counter()
for name in sys.argv[3:]:
    path = hf_hub_download(sys.argv[1], name)
    if sys.argv[2] == "delete":  # as the converter releases a shard: its pages are never written
        os.unlink(os.path.realpath(path))
        os.unlink(path)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": ru.ru_utime + ru.ru_stime,
                  "user": ru.ru_utime, "sys": ru.ru_stime}))
"""

HUB_CONVERT = """
import json, resource, sys, time
from flashmoe.convert import convert_checkpoint
t = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]), progress=False)
elapsed = time.perf_counter() - t
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
ru = resource.getrusage(resource.RUSAGE_SELF)
cpu = ru.ru_utime + ru.ru_stime
print(json.dumps({"seconds": elapsed, "peak_rss_kb": int(hwm.split()[1]), "cpu": cpu,
                  "user": ru.ru_utime, "sys": ru.ru_stime}))
"""


PREFETCH = """
import sys
from huggingface_hub import snapshot_download
snapshot_download(sys.argv[1])
"""


def put_sparse_checkpoint(hub, repo: str, src: Path) -> None:
    """Commit ``src`` (``write_checkpoint(sparse=True)``) to ``repo`` on the emulator: each shard
    its header and a hole (``HubEmulator.put_sparse_file``), the small files as they are."""
    hub.create_repo(repo, "bench", False)
    for p in sorted(src.iterdir()):
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                head = f.read(8)
                head += f.read(int.from_bytes(head, "little"))
            hub.put_sparse_file(repo, p.name, head, p.stat().st_size)
        else:
            hub.put_file(repo, p.name, p.read_bytes())


def hub_main(args: argparse.Namespace) -> None:
    """Streamed conversion from the Hub emulator against the download alone (see the docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hub_emulator import HubEmulator

    variants = dict(v.split("=", 1) for v in args.variant or [f"this={sys.executable}"])
    src, out, home = args.dir / "src", args.dir / "out", args.dir / "hf-home"
    shutil.rmtree(args.dir, ignore_errors=True)
    hub = HubEmulator(args.dir / "hub-server").start()
    try:
        total = write_checkpoint(src, args.layers, int(args.shard_gb * (1 << 30)))
        hub.create_repo(HUB_REPO, "bench", False)
        shards = sorted(p.name for p in src.glob("*.safetensors"))
        for p in sorted(src.iterdir()):
            if p.name in shards:
                hub.put_local_file(HUB_REPO, p.name, p)
            else:
                hub.put_file(HUB_REPO, p.name, p.read_bytes())
        shutil.rmtree(src)
        print(f"synthetic checkpoint on the emulator: {total / 1e9:.2f} GB in {len(shards)} shards")
        token = "hf_emulator_write_token"
        base = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_TOKEN": token}
        base.update(HF_HUB_CACHE=str(home / "hub"), HF_HUB_DISABLE_XET="1", PYTHONWARNINGS="ignore")
        base.pop("HF_HUB_OFFLINE", None)

        cached = args.dir / "hf-cached"  # --cached: every shard in this Hub cache already
        env_cached = {**base, "HF_HOME": str(cached), "HF_HUB_CACHE": str(cached / "hub")}
        if args.cached:
            quiet = {**env_cached, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
            subprocess.run([sys.executable, "-c", PREFETCH, HUB_REPO], env=quiet, check=True)

        def child(code: str, argv: list[str], python: str = sys.executable, env=None) -> dict:
            shutil.rmtree(home, ignore_errors=True)
            drop_caches(args.dir / "hub-server")
            if env is env_cached:  # as if just downloaded: the shards in the page cache
                for blob in (cached / "hub").rglob("blobs/*"):
                    with open(blob, "rb") as f:
                        while f.read(16 << 20):
                            pass
            r = subprocess.run(
                [python, "-c", code, *argv], env=env or base, capture_output=True, text=True
            )
            if r.returncode:
                raise SystemExit(f"{argv}: {r.stderr.strip().splitlines()[-1:]}")
            shutil.rmtree(out, ignore_errors=True)
            return {**json.loads(r.stdout.strip().splitlines()[-1]), "load": os.getloadavg()[0]}

        ref = "download alone, each shard deleted once fetched"
        times: dict[str, list[float]] = {"download alone, shards kept": [], ref: []}
        cpu: dict[str, list[float]] = {}
        split: dict[str, list[tuple[float, float]]] = {}  # (user, sys) per run
        load: list[float] = []  # 1-minute load average after each run
        rss: dict[str, int] = {}
        for _ in range(args.repeat):
            for name, mode in zip(list(times), ("keep", "delete"), strict=False):
                r = child(DOWNLOAD, [HUB_REPO, mode, *shards])
                times[name].append(r["seconds"])
                cpu.setdefault(name, []).append(r["cpu"])
                split.setdefault(name, []).append((r["user"], r["sys"]))
                load.append(r["load"])
            for label, path in variants.items():
                name = f"convert {label}"
                argv = [HUB_REPO, str(out), str(args.workers[0])]
                r = child(HUB_CONVERT, argv, path)
                times.setdefault(name, []).append(r["seconds"])
                cpu.setdefault(name, []).append(r["cpu"])
                split.setdefault(name, []).append((r["user"], r["sys"]))
                load.append(r["load"])
                rss[name] = max(rss.get(name, 0), r["peak_rss_kb"])
            for label, path in variants.items() if args.cached else ():
                name = f"convert {label}, shards cached (the repack alone)"
                r = child(HUB_CONVERT, [HUB_REPO, str(out), str(args.workers[0])], path, env_cached)
                for d, v in ((times, r["seconds"]), (cpu, r["cpu"])):
                    d.setdefault(name, []).append(v)
                split.setdefault(name, []).append((r["user"], r["sys"]))
                load.append(r["load"])
            print(" ".join(f"{n}: {t[-1]:.1f} s" for n, t in times.items()), flush=True)
            print(
                f"  load average after each run: {' '.join(f'{x:.2f}' for x in load[-len(times) :])}"
            )
        rows = []
        for name, seconds in times.items():
            ratios = [a / b for a, b in zip(times[ref], seconds, strict=True)]
            med = float(np.median(seconds))
            rows.append(
                {
                    "run": name,
                    "seconds": seconds,
                    "median_seconds": med,
                    "MB_per_s": total / med / 1e6,
                    "ratio_to_download_per_round": ratios,
                    "median_ratio_to_download": float(np.median(ratios)),
                    "peak_rss_MB": rss[name] / 1024 if name in rss else None,
                    "client_cpu_seconds": cpu[name],
                    "client_user_sys_seconds": split[name],
                }
            )
            print(
                f"{name:48s} median {med:6.2f} s ({' '.join(f'{t:.1f}' for t in seconds)}) "
                f"{total / med / 1e6:6.0f} MB/s  ratio to the download (deleted) "
                f"{rows[-1]['median_ratio_to_download']:.2f} "
                f"({' '.join(f'{r:.2f}' for r in ratios)}); client CPU "
                f"{float(np.median(cpu[name])):.1f} s (user "
                f"{float(np.median([u for u, _ in split[name]])):.1f}, sys "
                f"{float(np.median([s for _, s in split[name]])):.1f})",
                flush=True,
            )
        print(f"load average (1 min) after the runs: {min(load):.2f}-{max(load):.2f}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            result = {"checkpoint_bytes": total, "layers": args.layers, "rows": rows, "load": load}
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        hub.stop()
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


PLAN_REPO = "bench/plan-moe"

PLAN_IN_PROCESS = """
import json, sys, time
t = time.perf_counter()
from flashmoe.convert.plan import plan_layout
imported = time.perf_counter() - t
from huggingface_hub import HfApi
t = time.perf_counter()
HfApi().get_safetensors_metadata(sys.argv[1])
headers = time.perf_counter() - t
t = time.perf_counter()
plan = plan_layout(sys.argv[1], progress=False)
print(json.dumps({"import": imported, "headers": headers, "plan": time.perf_counter() - t,
                  "shards": plan.shards}))
"""


def plan_main(args: argparse.Namespace) -> None:
    """``flashmoe-convert --plan ORG/NAME`` of a many-shard repo on the Hub emulator: shards of
    their real headers and holes (``write_checkpoint(sparse=True)``, ``put_sparse_file``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from hub_emulator import HubEmulator

    src, home = args.dir / "src", args.dir / "hf-home"
    shutil.rmtree(args.dir, ignore_errors=True)
    hub = HubEmulator(args.dir / "hub-server").start()
    hub.latency = args.latency_ms / 1000
    try:
        total = write_checkpoint(src, args.layers, shard_bytes_for(args.layers, args.shards), True)
        put_sparse_checkpoint(hub, PLAN_REPO, src)
        shards = len(list(src.glob("*.safetensors")))
        print(
            f"{PLAN_REPO} on the emulator: {args.layers} layers, {total / 1e9:.1f} GB in {shards} "
            f"shards (headers and holes); {args.latency_ms:g} ms per request"
        )
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home)}
        env.update(HF_HUB_CACHE=str(home / "hub"), HF_HUB_DISABLE_XET="1", PYTHONWARNINGS="ignore")
        env.update(HF_TOKEN="hf_emulator_write_token")
        env.pop("HF_HUB_OFFLINE", None)
        cli = Path(sys.executable).parent / "flashmoe-convert"
        rows: dict[str, list[float]] = {}
        for _ in range(args.repeat):
            shutil.rmtree(home, ignore_errors=True)  # nothing cached: every round fetches
            t = time.perf_counter()
            r = subprocess.run(
                [str(cli), "--plan", PLAN_REPO, "--json"], env=env, capture_output=True
            )
            rows.setdefault("flashmoe-convert --plan (process, imports included)", []).append(
                time.perf_counter() - t
            )
            if r.returncode or json.loads(r.stdout)["shards"] != shards:
                raise SystemExit(r.stderr.decode().strip().splitlines()[-1:])
            shutil.rmtree(home, ignore_errors=True)
            r = subprocess.run(
                [sys.executable, "-c", PLAN_IN_PROCESS, PLAN_REPO],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            got = json.loads(r.stdout.strip().splitlines()[-1])
            rows.setdefault("import flashmoe.convert.plan", []).append(got["import"])
            rows.setdefault("get_safetensors_metadata (headers alone)", []).append(got["headers"])
            rows.setdefault("plan_layout() (in process, after the above)", []).append(got["plan"])
        for name, seconds in rows.items():
            runs = " ".join(f"{t:.2f}" for t in seconds)
            print(f"{name:54s} median {float(np.median(seconds)):5.2f} s ({runs})")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            result = {"shards": shards, "layers": args.layers, "latency_ms": args.latency_ms}
            args.json.write_text(json.dumps({**result, "seconds": rows}, indent=2) + "\n")
    finally:
        hub.stop()
        shutil.rmtree(args.dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", type=Path, default=Path("/work/bench-tmp"), help="scratch directory (removed)"
    )
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size (mlx-lm uses 5)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--verify", action="store_true", help="also time a conversion with --verify")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--hub", action="store_true", help="streamed from the Hub emulator")
    ap.add_argument(
        "--variant", action="append", help="--hub: LABEL=PYTHON, an interpreter to convert with"
    )
    ap.add_argument(
        "--cached",
        action="store_true",
        help="--hub: also convert each variant with every shard already in the Hub cache",
    )
    ap.add_argument("--plan", action="store_true", help="time --plan of a many-shard Hub repo")
    ap.add_argument("--shards", type=int, default=100, help="--plan: shards of the repo")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="--plan: per request")
    args = ap.parse_args()
    if args.hub:
        return hub_main(args)
    if args.plan:
        return plan_main(args)

    src, out = args.dir / "src", args.dir / "out"
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        t = time.perf_counter()
        total = write_checkpoint(src, args.layers, int(args.shard_gb * (1 << 30)))
        print(
            f"synthetic checkpoint: {total / 1e9:.2f} GB in {len(list(src.glob('*.safetensors')))} shards "
            f"({time.perf_counter() - t:.0f} s to write)"
        )
        cache = drop_caches(src)
        rows = []

        def row(
            name: str,
            seconds: list[float],
            rss_kb: int | None,
            ref: list[float] | None,
            ref2: list[float] | None = None,
        ) -> None:
            med = float(np.median(seconds))
            ratios = [a / b for a, b in zip(ref, seconds, strict=False)] if ref else []
            ratio = float(np.median(ratios)) if ratios else None
            ratios2 = [a / b for a, b in zip(ref2, seconds, strict=False)] if ref2 else []
            ratio2 = float(np.median(ratios2)) if ratios2 else None
            rows.append(
                {
                    "run": name,
                    "seconds": seconds,
                    "median_seconds": med,
                    "MB_per_s": total / med / 1e6,
                    "ratio_to_cp_sync_per_round": ratios,
                    "median_ratio_to_cp_sync": ratio,
                    "ratio_to_cp_per_round": ratios2,
                    "median_ratio_to_cp": ratio2,
                    "peak_rss_MB": rss_kb / 1024 if rss_kb else None,
                }
            )
            r = f"{ratio:5.2f}" if ratio is not None else "   - "
            r2 = f"{ratio2:5.2f}" if ratio2 is not None else "   - "
            m = f"{rss_kb / 1024:5.0f}" if rss_kb else "    -"
            runs = " ".join(f"{t:.1f}" for t in seconds)
            print(
                f"{name:32s} median {med:6.2f} s ({runs}) {total / med / 1e6:6.0f} MB/s  "
                f"ratio to cp+sync {r}, to cp {r2}  peak RSS {m} MB",
                flush=True,
            )

        # Interleaved rounds (cp, cp + sync, each converter setting): on a shared machine the load
        # drifts, so each round's ratio compares runs made moments apart; the median is reported.
        names = ["cp + sync", "cp (no sync)"] + [
            f"flashmoe-convert workers={w}" for w in args.workers
        ]
        times: dict[str, list[float]] = {n: [] for n in names}
        rss: dict[str, int] = {}
        for _ in range(args.repeat):
            times["cp + sync"].append(time_cp(src, out, True))
            times["cp (no sync)"].append(time_cp(src, out, False))
            for w in args.workers:
                r = time_convert(src, out, w)
                name = f"flashmoe-convert workers={w}"
                times[name].append(r["seconds"])
                rss[name] = max(rss.get(name, 0), r["peak_rss_kb"])
        if args.verify:
            name = f"  ... with --verify (w={args.workers[0]})"
            r = time_convert(src, out, args.workers[0], verify=True)
            times[name], rss[name] = [r["seconds"]], r["peak_rss_kb"]
            times["cp + sync"].append(time_cp(src, out, True))  # a reference next to it
        ref = times["cp + sync"]
        for name, seconds in times.items():
            conv = name.startswith("flashmoe")
            row(
                name,
                seconds,
                rss.get(name),
                None if name == "cp + sync" else ref,
                times["cp (no sync)"] if conv else None,
            )
        result = {
            "checkpoint_bytes": total,
            "layers": args.layers,
            "geometry": {
                "hidden": HIDDEN,
                "experts": EXPERTS,
                "moe_intermediate": MOE_I,
                "bits": 4,
                "group_size": 64,
            },
            "page_cache": cache,
            "cpus": os.cpu_count(),
            "rows": rows,
        }
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
