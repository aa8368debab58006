"""Concurrent load on a real ``flashmoe-serve`` over loopback: requests/s, tokens/s, latency, bank.

    python benchmarks/serve_bench.py [LAYOUT] [--clients 1,2,4] [--requests 8] [--max-tokens 32]
        [--serve-args '--bank-experts 6']

Without LAYOUT a tiny random-weight checkpoint is built and converted in a temporary directory,
and stock ``mlx_lm.server`` on that checkpoint is measured the same way for reference.
Each client sends ``--requests`` non-streaming chat requests back to back, each with a prompt no
other request shares (so the server's prompt cache cannot help); the bank counters come from
``GET /flashmoe/stats`` before and after each level (decode and prefill together): hit rate, MB
read, exposed I/O (the time computation waited for reads) per token and, with read-ahead
(``--serve-args '--prefetch on'``), its precision and the share of bytes read ahead never used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = "apple river stone cloud engine garden silver window market forest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None = None) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, data, {"Content-Type": "application/json"})
        r = c.getresponse()
        payload = r.read()
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {payload[:200]!r}")
        return json.loads(payload)
    finally:
        c.close()


def _prompt(i: int) -> str:
    words = WORDS.split()
    return f"Request {i}: " + " ".join(words[(i * 7 + j) % len(words)] for j in range(12))


def tiny_layout(root: Path, family: str) -> Path:
    from flashmoe.convert import convert_checkpoint

    from flashmoe.fixtures import make_checkpoint

    src = make_checkpoint(root / "ckpt", family)
    out = root / "layout"
    convert_checkpoint(src, out, progress=False)
    return out


def start_server(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
        try:
            _request(port, "GET", "/health")
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{' '.join(cmd)} did not come up")


port_has_stats: dict[int, bool] = {}


def run_level(
    port: int, clients: int, requests: int, max_tokens: int, base: int, bias: dict | None = None
) -> dict:
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(c: int) -> None:
        try:
            for r in range(requests):
                body = {
                    "messages": [{"role": "user", "content": _prompt(base + c * requests + r)}],
                    "max_tokens": max_tokens,
                    "temperature": 0.0,
                }
                if bias:
                    body["logit_bias"] = bias
                t0 = time.perf_counter()
                out = _request(port, "POST", "/v1/chat/completions", body)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    tokens[0] += out["usage"]["completion_tokens"]
        except BaseException as e:  # reported by the caller
            errors.append(e)

    stats = port_has_stats.get(port, False)
    before = _request(port, "GET", "/flashmoe/stats") if stats else None
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    lat = sorted(latencies)
    hit_rate = mb = io_ms = precision = unused = None
    if stats:
        after = _request(port, "GET", "/flashmoe/stats")
        d = {k: after[k] - before[k] for k in after if isinstance(after[k], (int, float))}
        n = max(tokens[0], 1)
        hit_rate = d["hits"] / (d["hits"] + d["misses"]) if d["hits"] + d["misses"] else 0.0
        mb = d["bytes_read"] / 1e6 / n
        io_ms = 1e3 * d["io_seconds"] / n  # exposed: the time computation waited for reads
        if d.get("prefetch_experts"):
            precision = d["prefetch_used"] / d["prefetch_experts"]
            unused = d["prefetch_unused_bytes"] / d["bytes_read"] if d["bytes_read"] else 0.0
    return {
        "clients": clients,
        "requests": len(lat),
        "tokens": tokens[0],
        "seconds": wall,
        "requests_per_s": len(lat) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50_s": statistics.median(lat),
        "p95_s": lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))],
        "hit_rate": hit_rate,
        "mb_read_per_token": mb,
        "exposed_io_ms_per_token": io_ms,
        "prefetch_precision": precision,
        "prefetch_unused_share": unused,
    }


def end_token_bias(layout: Path) -> dict[str, float]:
    """``logit_bias`` pushing the end tokens away: the tokenizer's EOS ids and those of the
    config (``load_config`` merges generation_config.json's), as the servers load them."""
    from mlx_lm.utils import load_config, load_tokenizer

    eos = load_config(layout).get("eos_token_id")
    ids = sorted(load_tokenizer(layout, eos_token_ids=eos).eos_token_ids)
    return {str(i): -100.0 for i in ids}


def table(rows: list[dict]) -> str:
    lines = [
        "| server | clients | requests | tokens | req/s | tok/s | p50 latency s | p95 latency s "
        "| bank hit rate | MB read/token | exposed I/O ms/token | read-ahead precision "
        "| read-ahead MB never used |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v):
        return "-" if v is None else f"{v * 100:.1f}%"

    for r in rows:
        mb = "-" if r["mb_read_per_token"] is None else f"{r['mb_read_per_token']:.2f}"
        io = r.get("exposed_io_ms_per_token")
        io = "-" if io is None else f"{io:.2f}"
        lines.append(
            f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens']} | "
            f"{r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
            f"{r['p95_s']:.2f} | {pct(r['hit_rate'])} | {mb} | {io} | "
            f"{pct(r.get('prefetch_precision'))} | {pct(r.get('prefetch_unused_share'))} |"
        )
    return "\n".join(lines)


def measure(name: str, cmd: list[str], stats: bool, args) -> list[dict]:
    """Start one server, warm it up, run every client level; the rows."""
    port = _free_port()
    port_has_stats[port] = stats
    proc = start_server(cmd, port)
    rows, base = [], 0
    try:
        run_level(port, 1, 2, args.max_tokens, base=10_000, bias=args.bias)  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            level = run_level(port, clients, args.requests, args.max_tokens, base, args.bias)
            row = {"server": name, **level}
            rows.append(row)
            base += clients * args.requests
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("layout", nargs="?", help="layout directory (default: a tiny random model)")
    p.add_argument("--family", default="qwen3_5_moe", help="tiny model family without LAYOUT")
    p.add_argument("--clients", default="1,2,4")
    p.add_argument("--requests", type=int, default=8, help="per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--serve-args", default="", help="flashmoe-serve options, e.g. '--k 4'")
    p.add_argument(
        "--reference",
        default=None,
        metavar="CHECKPOINT",
        help="also load stock mlx_lm.server with this checkpoint (the tiny model's without LAYOUT)",
    )
    p.add_argument("--no-reference", action="store_true", help="skip stock mlx_lm.server")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument(
        "--no-eos",
        action="store_true",
        help="bias the end tokens away (logit_bias -100) so every reply runs to --max-tokens: a "
        "random-weight model may otherwise end each reply at once, leaving no decode to measure",
    )
    args = p.parse_args(argv)
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        if args.layout:
            layout, reference = Path(args.layout), args.reference
        else:
            layout = tiny_layout(Path(tmp), args.family)
            reference = args.reference or str(Path(tmp) / "ckpt")
        args.bias = end_token_bias(layout) if args.no_eos else None
        serve = [py, "-m", "flashmoe.runtime.serve", str(layout), *shlex.split(args.serve_args)]
        rows = measure("flashmoe-serve", serve, True, args)
        if reference and not args.no_reference:
            stock = [py, "-m", "mlx_lm", "server", "--model", reference]
            rows += measure("mlx_lm.server", stock, False, args)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"load average: {os.getloadavg()[0]:.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
