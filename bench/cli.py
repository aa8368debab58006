"""``flashmoe-bench``: benchmark subcommands (``io``; others add theirs with ``add_parser``)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="flashmoe-bench", description="flashmoe benchmarks")
    sub = p.add_subparsers(dest="command", required=True)

    from . import io_bench

    io = sub.add_parser(
        "io", help="expert-read throughput: native/Python readers vs fio and memcpy"
    )
    io_bench.add_arguments(io)
    io.set_defaults(func=io_bench.run)

    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
