"""``flashmoe-run``: generate text with a model whose routed experts stream from a layout."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from ..cli import command
from .firstuse import start_slow_notice, warm_up
from .options import (
    add_generation_options,
    add_runtime_options,
    check_prompt_length,
    load_options,
    read_prompt,
)

PROG = "flashmoe-run"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text from a flashmoe layout (a directory or a Hub repo id), "
        "streaming the routed experts from disk.",
    )
    add_runtime_options(p, model_optional=True)
    g = p.add_argument_group("generation (as mlx_lm.generate)")
    g.add_argument("--prompt", "-p", default="Hello", help="the prompt, or - to read stdin")
    g.add_argument("--system-prompt", default=None)
    g.add_argument("--ignore-chat-template", action="store_true")
    add_generation_options(g, max_tokens_help="tokens to generate at most")
    p.add_argument(
        "--timing", action="store_true", help="print per-token timing and I/O statistics"
    )
    p.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="MODEL is a Hub repo of a plain MLX checkpoint: convert it into the cache without "
        "asking",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="build a small random-weight model, convert it and run it (no network)",
    )
    return p


def _prompt_tokens(args, tokenizer) -> list[int]:
    prompt = read_prompt(args)
    if args.ignore_chat_template or tokenizer.chat_template is None:
        return tokenizer.encode(prompt)
    messages = []
    if args.system_prompt:
        messages.append({"role": "system", "content": args.system_prompt})
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def generate(
    model, tokenizer, prompt: list[int], args, out=sys.stdout, err=sys.stderr
) -> list[int]:
    """Stream a completion to ``out``; with ``args.timing`` print statistics to ``err``.

    A pipelined model (``load`` under a group) runs this on every rank: rank 0 writes, the
    others pass ``os.devnull`` streams; the per-rank figures are gathered to rank 0.
    """
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    rt = model.flashmoe
    group = rt.group
    if group is not None:  # every rank samples, so all must draw the same numbers
        from .group import shared_seed

        args.seed = shared_seed(group, args.seed)
    if args.seed is not None:
        mx.random.seed(args.seed)
    stats, timing = rt.store.stats, rt.timing
    tokens: list[int] = []
    with _watched(rt, lambda: (stats.calls, len(tokens))):
        transfer = _warm_up(model, prompt, args, err)
        stats.reset()
        if timing:
            timing.reset()
        sampler = make_sampler(args.temp, args.top_p, args.min_p)
        start = time.perf_counter()
        first = None
        response = None
        notice = start_slow_notice(err=err)
        try:
            for response in stream_generate(
                model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler
            ):
                if first is None:
                    notice.cancel()
                    first = (
                        time.perf_counter() - start,
                        stats.misses,
                        stats.hits,
                        stats.bytes_read,
                        stats.io_seconds,
                        (timing.dense, timing.router, timing.compute) if timing else None,
                        time.perf_counter(),
                        (stats.sync_seconds, stats.host_seconds),
                    )
                tokens.append(response.token)
                out.write(response.text)
                out.flush()
        finally:
            notice.cancel()
    out.write("\n")
    out.flush()
    if args.timing and response is not None and first is not None:
        n = len(tokens) - 1
        ttft, m0, h0, b0, io0, t0, decode_start, (sync0, host0) = first
        decode_s = time.perf_counter() - decode_start
        lines = [
            f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tok/s, "
            f"TTFT {ttft * 1000:.0f} ms",
            f"decode: {len(tokens)} tokens, {n / decode_s if n and decode_s else 0:.2f} tok/s"
            f" ({response.generation_tps:.2f} tok/s by mlx-lm)",
        ]
        if group is not None:
            from .pipeline import rank_lines

            lines += rank_lines(rt, n, first, transfer)
        else:
            lines.append(
                f"bank: {rt.slots} experts/layer, hit rate {stats.hit_rate * 100:.1f}% overall"
            )
        if n and group is None:
            miss, hit = stats.misses - m0, stats.hits - h0
            rate = hit / (hit + miss) if hit + miss else 0.0
            io_ms = (stats.io_seconds - io0) * 1000 / n
            lines.append(
                f"per decode token: expert I/O {io_ms:.2f} ms exposed, "
                f"{(stats.bytes_read - b0) / n / 1e6:.2f} MB read, hit rate {rate * 100:.1f}%, "
                f"router syncs {(stats.sync_seconds - sync0) * 1000 / n:.2f} ms, "
                f"streaming host {(stats.host_seconds - host0) * 1000 / n:.2f} ms"
            )
            if stats.prefetch_experts:
                lines.append(
                    f"read-ahead (whole run): {stats.prefetch_experts} experts, precision "
                    f"{stats.prefetch_precision * 100:.1f}%, recall {stats.prefetch_recall * 100:.1f}%, "
                    f"{stats.prefetch_unused_bytes / 1e6:.1f} MB never used, "
                    f"{stats.prefetch_seconds * 1000 / max(1, len(tokens)):.2f} ms in flight per token"
                )
            if timing:
                d, r, c = (
                    (now - then) * 1000 / n
                    for now, then in zip(
                        (timing.dense, timing.router, timing.compute), t0, strict=True
                    )
                )
                lines.append(
                    f"per decode token: dense {d:.2f} ms, router sync {r:.2f} ms, "
                    f"expert compute {c:.2f} ms"
                )
        lines.append(f"peak memory {response.peak_memory:.3f} GB")
        for line in lines:
            print(f"[timing] {line}", file=err)
    return tokens


def _warm_up(model, prompt: list[int], args, err) -> float | None:
    """With ``--timing``: the warm-up step, and on a pipelined model the seconds per token of
    its transfers (measured alone); None otherwise."""
    if not args.timing:
        return None
    warm = warm_up(model, prompt, err)
    print(
        f"[timing] warm-up {warm:.2f} s (first-use kernel compile, one prefill and one "
        "decode step; not counted in TTFT)",
        file=err,
    )
    if model.flashmoe.group is None:
        return None
    from .pipeline import transfer_seconds

    return transfer_seconds(model, model.flashmoe.group)


def _watched(rt, progress):
    """The watchdog over a generation on a pipelined model (no progress for the rank timeout
    ends the process); nothing for a single process."""
    if rt.group is None:
        return contextlib.nullcontext()
    from .group import waiting

    return waiting("generating", rank=rt.rank, progress=progress)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """``flashmoe-run``; exit codes as every flashmoe command (``flashmoe.cli``).

    Under ``mlx.launch`` every rank runs this: the model is split across the ranks (``load``),
    rank 0 prints the text and the figures, and an error on any rank ends every rank.
    """
    args = build_parser().parse_args(argv)
    from .group import RankError, agree, reporting, world

    group = world()
    if args.demo:
        if group is not None:
            raise RankError("--demo runs in one process", silent=group.rank() != 0)
        from .demo import run_demo

        return run_demo(args)
    if not args.model:
        raise ValueError("MODEL is required (or use --demo)")
    from .from_checkpoint import convert_into_cache, is_plain_checkpoint_repo
    from .loader import load

    if is_plain_checkpoint_repo(args.model, args.revision):
        if group is not None:  # each rank would convert (and ask) on its own
            raise RankError(
                f"{args.model} is a checkpoint, not a layout: convert it on every machine "
                "first (flashmoe-convert), then run the layout across ranks",
                silent=group.rank() != 0,
            )
        args.model = str(convert_into_cache(args.model, yes=args.yes, revision=args.revision))
    model, tokenizer = load(
        args.model, **load_options(args), timing=args.timing, quiet=False, group=group
    )
    finished = False  # every rank got through: rank 0 may gather the --trace
    try:
        with reporting(group):

            def prepare() -> list[int]:
                prompt = _prompt_tokens(args, tokenizer)
                check_prompt_length(model, len(prompt))
                return prompt

            if group is None:
                prompt = prepare()
            else:  # the same prompt on every rank, or a one-line error from rank 0
                prompt = agree(
                    group,
                    prepare,
                    identity=lambda p: repr(p).encode(),
                    what="reading the prompt",
                    differs="prompt",
                )
            if model.flashmoe.rank == 0:
                generate(model, tokenizer, prompt, args)
            else:
                with open(os.devnull, "w") as null:
                    generate(model, tokenizer, prompt, args, out=null, err=null)
            if group is not None:
                from .group import barrier

                barrier(group, "finishing")
            finished = True
    finally:
        # writes the rest of a --trace (on rank 0, with every rank's layers), closes files
        model.flashmoe.close(gather=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
