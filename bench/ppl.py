"""``flashmoe-bench ppl LAYOUT --text FILE``: perplexity with flashmoe and stock mlx-lm.

Both engines score the same tokens (the layout's tokenizer; windows of ``--window`` tokens, no
cache between windows) for the config's k and each reduced ``--k``. At every k the per-token
log-likelihoods and the logits' sha256 must be identical between the engines; the command fails
(exit 1, after writing its JSON) if they are not. For reduced k, the KL divergence and top-1
agreement against the config's k show what pruning experts costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .machine import describe, summary
from .measure import run_worker
from .report import (
    BenchError,
    command_line,
    int_list,
    open_layout,
    output_path,
    source_of,
    table,
    write_json,
)

COLUMNS = [
    "k",
    "tokens",
    "PPL flashmoe",
    "PPL mlx-lm",
    "identical",
    "KL vs full k (nats/token)",
    "top-1 agreement vs full k",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("layout", help="flashmoe layout directory")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--source", help="source checkpoint (default: the index's source path)")
    p.add_argument("--k", type=int_list, default=None, help="reduced k values (default: k/2)")
    p.add_argument("--max-tokens", type=int, default=512, help="score at most this many tokens")
    p.add_argument("--window", type=int, default=256, help="tokens per forward pass")
    p.add_argument("--bank-experts", type=int, default=None, help="flashmoe bank (default: all)")
    p.add_argument("--no-mlx-lm", action="store_true", help="flashmoe only (no agreement check)")
    p.add_argument("--json", help="output JSON (default flashmoe-bench-out/ppl-<time>.json)")
    p.add_argument("--timeout", type=float, default=3600)


def _tokens(layout: Path, text: str, limit: int) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(layout)
    ids = tok.encode(text)
    if len(ids) < 2:
        raise BenchError("--text has fewer than 2 tokens")
    return ids[: limit + 1]


def run(args) -> int:
    index, root = open_layout(args.layout)
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"--text {args.text}: {e}") from None
    source = None if args.no_mlx_lm else source_of(index, args.source)
    if not args.no_mlx_lm and source is None:
        raise BenchError("no source checkpoint for mlx-lm: pass --source or --no-mlx-lm")
    ks = [None] + [k for k in (args.k or [max(1, index.top_k // 2)]) if k != index.top_k]
    for k in ks[1:]:
        if not 1 <= k <= index.num_experts:
            raise BenchError(f"--k {k} is not in 1..{index.num_experts}")
    tokens = _tokens(root, text, args.max_tokens)
    spec = {"mode": "ppl", "tokens": tokens, "window": args.window, "ks": ks}
    ours = run_worker(
        dict(spec, engine="flashmoe", path=str(root),
             options={"bank_experts": args.bank_experts}),
        timeout=args.timeout,
    )  # fmt: skip
    if "error" in ours:
        raise BenchError(f"flashmoe: {ours['error']}")
    ref = None
    if source:
        ref = run_worker(dict(spec, engine="mlx-lm", path=str(source)), timeout=args.timeout)
        if "error" in ref:
            raise BenchError(f"mlx-lm: {ref['error']}")
    rows, identical = [], True
    for i, run_ in enumerate(ours["runs"]):
        other = ref["runs"][i] if ref else None
        same = None
        if other:
            same = run_["nll"] == other["nll"] and run_["logits_sha256"] == other["logits_sha256"]
            identical &= same
        rows.append(
            [
                f"{run_['k'] or index.top_k}" + (" (config)" if run_["k"] is None else ""),
                run_["tokens"],
                run_["ppl"],
                other["ppl"] if other else None,
                "-" if same is None else "yes" if same else "NO",
                run_.get("kl_vs_first"),
                run_.get("top1_agreement_vs_first"),
            ]
        )
    machine = describe(root)
    out = output_path(args.json, "ppl")
    result = {
        "command": command_line(),
        "machine": machine,
        "layout": str(root),
        "source": str(source) if source else None,
        "text": str(args.text),
        "tokens": len(tokens) - 1,
        "identical": identical if ref else None,
        "columns": COLUMNS,
        "rows": rows,
        "flashmoe": ours,
        "mlx_lm": ref,
    }
    write_json(out, result)
    print(f"machine: {summary(machine)}")
    print(f"text: {args.text}, {len(tokens) - 1} scored tokens, windows of {args.window}\n")
    print(table(COLUMNS, [[r[0], r[1], r[2], r[3], r[4],
                           None if r[5] is None else f"{r[5]:.4f}",
                           None if r[6] is None else f"{r[6] * 100:.1f}%"] for r in rows]))  # fmt: skip
    print(f"\nJSON: {out}")
    if ref and not identical:
        print("flashmoe-bench: error: flashmoe and mlx-lm disagree", file=sys.stderr)
        return 1
    return 0
