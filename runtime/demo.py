"""``flashmoe-run --demo``: build a small random-weight MoE checkpoint, convert it, stream it.

No network: the checkpoint is written by mlx-lm's own classes (``flashmoe.fixtures``), the
conversion runs ``flashmoe-convert`` in a subprocess, and the generation streams experts through a
bank holding half of each layer's experts. It ends by checking the tokens against stock mlx-lm.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..layouts import INDEX_FILE


def demo_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "flashmoe" / "demo-v1"


def build_demo(root: Path) -> tuple[Path, Path]:
    """The demo's source checkpoint and layout under ``root`` (built once, then reused)."""
    from ..fixtures import make_checkpoint

    src, layout = root / "checkpoint", root / "layout"
    if not (src / "config.json").exists():
        print(f"demo: writing a random-weight qwen3_5_moe checkpoint to {src}", file=sys.stderr)
        make_checkpoint(
            src,
            "qwen3_5_moe",
            num_experts=32,
            top_k=4,
            num_layers=4,
            hidden=256,
            moe_intermediate=128,
            vocab_size=512,
        )
    if not (layout / INDEX_FILE).exists():
        print(f"demo: converting it with flashmoe-convert to {layout}", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "flashmoe.convert.cli", str(src), "-o", str(layout), "--quiet"],
            check=True,
        )
    return src, layout


def run_demo(args) -> int:
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    from .cli import _prompt_tokens, generate
    from .loader import load

    src, layout = build_demo(demo_dir())
    print(
        "demo: the weights are random, so the text is gibberish; what matters is that the experts "
        "stream from disk and the tokens match stock mlx-lm",
        file=sys.stderr,
    )
    args.timing = True
    args.max_tokens = min(args.max_tokens, 32)
    model, tokenizer = load(
        str(layout),
        bank_experts=args.bank_experts or 16,
        cache_io_split=args.cache_io_split,
        io_threads=args.io_threads,
        reader=args.reader,
        timing=True,
        quiet=False,
    )
    prompt = _prompt_tokens(args, tokenizer)
    tokens = generate(model, tokenizer, prompt, args)
    ref_model, ref_tok = mlx_lm.load(str(src))
    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(args.temp, args.top_p, args.min_p)
    ref = [
        r.token
        for r in mlx_lm.stream_generate(
            ref_model, ref_tok, prompt, max_tokens=args.max_tokens, sampler=sampler
        )
    ]
    same = ref == tokens
    print(
        f"demo: tokens identical to stock mlx-lm on the source checkpoint: {same}", file=sys.stderr
    )
    return 0 if same else 1
