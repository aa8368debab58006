"""``flashmoe-bench``: the user-facing measurements (one subcommand each).

One-off experiments, their results and the reader-vs-fio study live in the repository's unpackaged
``benchmarks/`` folder (see its README).
"""

from __future__ import annotations

import argparse

from ..cli import command


@command("flashmoe-bench")
def main(argv: list[str] | None = None) -> int:
    """``flashmoe-bench``; exit codes as every flashmoe command (``flashmoe.cli``)."""
    p = argparse.ArgumentParser(prog="flashmoe-bench", description="flashmoe benchmarks")
    sub = p.add_subparsers(dest="command", required=True)

    from . import gpu_bench, policy, ppl, runtime_bench, sweep, synth

    for name, module, text in (
        ("synth", synth, "synthetic checkpoint with real Qwen3.5 layer geometry, then converted"),
        ("sweep", sweep, "decode tok/s and expert I/O across cache-io-split (cold/warm, capped)"),
        ("runtime", runtime_bench, "flashmoe vs stock mlx-lm: full bank, 25%% bank, peak RSS"),
        ("gpu", gpu_bench, "stock mlx-lm and flashmoe in one process (GPU leases): banks x modes"),
        ("ppl", ppl, "perplexity with flashmoe and mlx-lm (must agree) and at reduced k"),
        (
            "policy",
            policy,
            "replay routing traces through expert-bank policies (hit rate, MB/token)",
        ),
    ):
        sp = sub.add_parser(name, help=text, description=module.__doc__.splitlines()[0])
        module.add_arguments(sp)
        sp.set_defaults(func=module.run)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
