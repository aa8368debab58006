"""Expert-streaming options shared by ``flashmoe-serve`` and ``flashmoe-chat`` (as ``flashmoe-run``)."""

from __future__ import annotations

import argparse

from ..layouts.hub import error_line as error_line  # re-exported for the CLIs


def add_runtime_options(p: argparse.ArgumentParser, *, model_optional: bool = False) -> None:
    """Add MODEL and the runtime's loading options (shared by flashmoe-run, -serve and -chat)."""
    p.add_argument(
        "model",
        nargs="?" if model_optional else None,
        help="layout directory or Hub repo id (ORG/NAME)",
    )
    s = p.add_argument_group("expert streaming")
    s.add_argument("--k", type=int, default=None, help="routed experts per token (default: config)")
    s.add_argument("--cache-io-split", type=int, default=1, help="chunks per expert read, 1..8")
    s.add_argument("--io-threads", type=int, default=8)
    s.add_argument("--reader", choices=("auto", "native", "python"), default="auto")
    s.add_argument("--bank-experts", type=int, default=None, help="expert slots per MoE layer")
    s.add_argument(
        "--memory-budget",
        type=float,
        default=None,
        metavar="GB",
        help="size the bank so dense weights + bank + KV cache fit in GB",
    )
    s.add_argument(
        "--verify", action="store_true", help="check every expert read against its checksum"
    )
    s.add_argument(
        "--direct-io",
        action="store_true",
        help="read experts around the page cache (O_DIRECT on Linux, F_NOCACHE on macOS)",
    )
    s.add_argument("--revision", default=None, help="Hub revision when MODEL is a repo id")
    s.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="record the routed experts of every MoE layer call to FILE (flashmoe-bench policy)",
    )


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``flashmoe.runtime.load`` from parsed options."""
    return dict(
        bank_experts=args.bank_experts,
        memory_budget_gb=args.memory_budget,
        cache_io_split=args.cache_io_split,
        io_threads=args.io_threads,
        reader=args.reader,
        k=args.k,
        verify=args.verify,
        direct_io=args.direct_io,
        revision=args.revision,
        trace=getattr(args, "trace", None),
    )
