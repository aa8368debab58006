"""Options shared by ``flashmoe-run``, ``-chat`` and ``-serve``: expert streaming, generation defaults."""

from __future__ import annotations

import argparse
import math
import sys

from ..layouts import MAX_SPLIT

_SEED_MAX = 2**64 - 1


# Generation defaults of flashmoe-run, -chat and -serve (a server request may ask for others).
MAX_TOKENS_DEFAULT = 512


def add_generation_options(g, *, max_tokens_help: str, seed: bool = True) -> None:
    """--max-tokens/-m, --temp, --top-p, --min-p (and --seed) on argument group ``g``, with the
    defaults every command shares (greedy, ``MAX_TOKENS_DEFAULT`` tokens)."""
    g.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=MAX_TOKENS_DEFAULT,
        help=f"{max_tokens_help} (default %(default)s)",
    )
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    if seed:
        g.add_argument("--seed", type=int, default=None)


def add_runtime_options(p: argparse.ArgumentParser, *, model_optional: bool = False) -> None:
    """Add MODEL and the runtime's loading options (shared by flashmoe-run, -serve and -chat)."""
    p.add_argument(
        "model",
        nargs="?" if model_optional else None,
        help="layout directory or Hub repo id (ORG/NAME)",
    )
    s = p.add_argument_group("expert streaming")
    s.add_argument("--k", type=int, default=None, help="routed experts per token (default: config)")
    s.add_argument(
        "--cache-io-split", type=int, default=1, help=f"chunks per expert read, 1..{MAX_SPLIT}"
    )
    s.add_argument(
        "--io-threads",
        type=int,
        default=None,
        help="read-pool threads (default: 16 on an NVIDIA GPU, where it was measured, else 8)",
    )
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
        "--no-fill",
        action="store_true",
        help="with a bank of every expert, read each expert when first routed instead of all "
        "at load (a faster start; the MoE layers sync on their router until every expert is in)",
    )
    s.add_argument(
        "--verify", action="store_true", help="check every expert read against its checksum"
    )
    s.add_argument(
        "--direct-io",
        action="store_true",
        help="read experts around the page cache (O_DIRECT on Linux, F_NOCACHE on macOS)",
    )
    s.add_argument(
        "--prefetch",
        choices=("off", "on", "auto"),
        default=None,
        help="read the next layer's guessed experts ahead (its router on the current hidden "
        "state) while this layer computes; auto backs off on low precision or a bank under 2 x "
        "top-k slots (default: auto on an NVIDIA GPU and on the CPU, where it was measured to "
        "win; off on Metal)",
    )
    s.add_argument(
        "--hits-first",
        choices=("on", "off"),
        default="on",
        help="in a decode step with misses, compute the resident experts while the misses are "
        "read (default on; same output; no effect on CUDA, where it would change the bits)",
    )
    s.add_argument(
        "--bank-policy",
        choices=("lru", "lfu", "lfuda"),
        default="lfu",
        help="which resident expert a miss evicts (default lfu; benchmarks/RESULTS.md compares them)",
    )
    s.add_argument("--revision", default=None, help="Hub revision when MODEL is a repo id")
    s.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="record the routed experts of every MoE layer call to FILE (flashmoe-bench policy)",
    )


def _check_text(name: str, text) -> None:
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
        raise ValueError(f"{name} is not valid UTF-8") from None


def read_prompt(args: argparse.Namespace, stdin=None) -> str:
    """``--prompt``, or standard input for ``-`` (strict UTF-8, not empty; ValueError otherwise)."""
    if args.prompt != "-":
        return args.prompt
    data = (stdin or sys.stdin.buffer).read()
    try:
        prompt = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"stdin: the prompt is not valid UTF-8 (byte {e.start})") from None
    if not prompt.strip():
        raise ValueError("stdin: the prompt is empty")
    return prompt


def check_prompt_length(model, n: int, what: str = "the prompt") -> None:
    """ValueError if ``n`` prompt tokens exceed the model's context (``max_position_embeddings``)."""
    config = model.flashmoe.index.config
    limit = config.get("text_config", config).get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool) and n > limit:
        raise ValueError(
            f"{what} has {n} tokens; the model's context is {limit} (max_position_embeddings)"
        )


def check_generation_options(args: argparse.Namespace) -> None:
    """One-line ValueErrors for the generation options a CLI defines (those it has)."""
    ranges = {"temp": (0, math.inf), "top_p": (0, 1), "min_p": (0, 1)}
    for name, (lo, hi) in ranges.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and lo <= value <= hi):
            bound = f">= {lo}" if hi == math.inf else f"in {lo}..{hi}"
            raise ValueError(f"--{name.replace('_', '-')} {value} must be finite and {bound}")
    top_k = getattr(args, "top_k", None)
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k {top_k} must be >= 0")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= _SEED_MAX:
        raise ValueError(f"--seed {seed} is not in 0..{_SEED_MAX}")
    memory = getattr(args, "memory_budget", None)
    if memory is not None and not (math.isfinite(memory) and memory >= 0):
        raise ValueError(f"--memory-budget {memory} must be a finite number of GB >= 0")
    prompt = getattr(args, "prompt", None)
    _check_text("--prompt", prompt)
    if prompt is not None and not prompt.strip():
        raise ValueError("--prompt is empty")
    _check_text("--system-prompt", getattr(args, "system_prompt", None))


def load_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``flashmoe.runtime.load`` from parsed options (checking the
    generation options first: a bad one fails before the model is loaded)."""
    check_generation_options(args)
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
        prefetch=args.prefetch,
        bank_policy=args.bank_policy,
        hits_first=args.hits_first == "on",
        fill_bank=False if getattr(args, "no_fill", False) else None,
    )
