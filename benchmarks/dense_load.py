"""``python benchmarks/dense_load.py LAYOUT``: what loading the dense (non-expert) weights costs, cold.

Each measurement is a fresh process with the layout's page cache dropped: ``load()`` then one
token. Reported: load seconds, time to the first token, peak RSS, and how much of
``model-dense.safetensors`` the page cache still holds afterwards (those pages duplicate the
weights MLX has read into its own memory: counted twice until the kernel reclaims them), with the
runtime's ``POSIX_FADV_DONTNEED`` after loading and without it (``load(drop_dense_cache=False)``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from flashmoe.bench import pagecache
from flashmoe.bench.report import (
    command_line,
    open_layout,
    output_path,
    table,
    write_json,
)

from flashmoe.cli import command

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import mlx.core as mx
from flashmoe.runtime import load
from flashmoe.bench.pagecache import resident_bytes
model, tok = load(sys.argv[1], bank_experts=int(sys.argv[2]), drop_dense_cache=sys.argv[3] == "1")
t1 = time.perf_counter()
mx.eval(model(mx.array([[1, 2, 3]])))
t2 = time.perf_counter()
cached, size = resident_bytes(model.flashmoe.root / model.flashmoe.index.dense.name)
print(json.dumps(dict(load_s=t1 - t0, first_token_s=t2 - t0, dense_bytes=size,
      dense_cached_bytes=cached,
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("layout", help="flashmoe layout directory")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="output JSON (default flashmoe-bench-out/dense-<time>.json)")


def run(args) -> int:
    index, root = open_layout(args.layout)
    files = pagecache.files_of(root)
    rows, results = [], []
    for drop in (True, False):
        for _ in range(args.repeat):
            pagecache.drop(files)
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(root), str(index.top_k), "1" if drop else "0"],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["drop_dense_cache"] = drop
            results.append(r)
            rows.append(
                [
                    "DONTNEED after load" if drop else "kept",
                    f"{r['load_s']:.2f}",
                    f"{r['first_token_s']:.2f}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['dense_bytes'] / 1e6:.0f}",
                    f"{r['dense_cached_bytes'] / 1e6:.0f}",
                ]
            )
    print(
        table(
            ["dense page cache", "load s", "first token s", "peak RSS MB", "dense MB", "cached MB"],
            rows,
        )
    )
    path = output_path(args.json, "dense")
    write_json(path, {"command": command_line(), "layout": str(root), "rows": results})
    print(f"wrote {path}")
    return 0


@command("python benchmarks/dense_load.py")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python benchmarks/dense_load.py", description=__doc__.splitlines()[0]
    )
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
