"""``flashmoe-convert SRC -o OUT`` and ``flashmoe-convert verify OUT``."""

from __future__ import annotations

import argparse
import sys

from ..cli import run_command
from ..layouts import DEFAULT_ALIGNMENT

PROG = "flashmoe-convert"


def build_parser() -> argparse.ArgumentParser:
    """The converter's argument parser (other commands may add options to it)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Repack an MLX Mixture-of-Experts checkpoint into a flashmoe layout "
        "(one file per MoE layer, one aligned record per expert). "
        f"'{PROG} verify OUT' checks an existing layout.",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint directory or Hugging Face repo id")
    p.add_argument(
        "-o",
        "--out",
        default=None,
        metavar="OUT",
        help="output directory (empty, or an interrupted conversion to resume)",
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print what the layout will be (sizes, disk needed, bank per RAM size) without "
        "downloading the checkpoint (a Hub repo: only config.json and the safetensors headers)",
    )
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    p.add_argument(
        "--alignment",
        type=int,
        default=DEFAULT_ALIGNMENT,
        metavar="N",
        help="record alignment in bytes, a power of two >= 4096 (default %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="files written in parallel (default: CPUs, at most 4)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="after writing, re-read every record and compare it with the source",
    )
    p.add_argument(
        "--revision",
        default=None,
        metavar="R",
        help="Hub revision (branch, tag or commit) to convert",
    )
    p.add_argument(
        "--keep-source",
        action="store_true",
        help="a Hub repo is converted shard by shard and each shard leaves the Hub cache once "
        "converted; keep them instead",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    from .hub import add_publish_options

    add_publish_options(p, with_repo=True)  # --upload-repo ORG/NAME [--private] ...
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} verify", description="Check a layout's file sizes and checksums."
    )
    p.add_argument("out", metavar="OUT", help="layout directory")
    p.add_argument("--sizes-only", action="store_true", help="check sizes, skip checksums")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _verify(argv: list[str]) -> int:
    args = build_verify_parser().parse_args(argv)
    from ..verify import verify_layout

    index = verify_layout(args.out, checksums=not args.sizes_only, progress=not args.quiet)
    what = "sizes" if args.sizes_only else "sizes and checksums"
    print(f"{args.out}: OK ({len(index.layers)} layers x {index.num_experts} experts, {what})")
    return 0


def _convert(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plan:
        return _plan(args)
    if args.json:
        parser.error("--json goes with --plan")
    if args.out is None:
        parser.error("the following arguments are required: -o/--out")
    if args.base_model is not None and not args.upload_repo:
        parser.error("--base-model goes with --upload-repo")
    if args.workers is not None and args.workers < 1:
        raise ValueError("--workers: must be >= 1")
    if args.upload_repo:
        from ..hubio import check_repo_id

        check_repo_id(args.upload_repo)  # fail before converting, not after
        if args.base_model is not None:
            try:
                check_repo_id(args.base_model)
            except ValueError as e:
                raise ValueError(f"--base-model: {e}") from None
    from . import convert_checkpoint

    index = convert_checkpoint(
        args.src,
        args.out,
        alignment=args.alignment,
        workers=args.workers,
        verify=args.verify,
        progress=not args.quiet,
        revision=args.revision,
        keep_source=args.keep_source,
    )
    if not args.quiet:
        print(f"{args.out}: {len(index.layers)} MoE layers x {index.num_experts} experts written")
    if args.upload_repo:
        from .hub import publish

        publish(
            args.out,
            args.upload_repo,
            private=args.private,
            revision=args.upload_revision,
            commit_message=args.commit_message,
            progress=not args.quiet,
            base_model=args.base_model,
        )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan_layout

    plan = plan_layout(
        args.src,
        revision=args.revision,
        alignment=args.alignment,
        progress=not (args.quiet or args.json),
    )
    print(plan.to_json() if args.json else plan.describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``flashmoe-convert``; exit codes as every flashmoe command (``flashmoe.cli``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        return run_command(PROG, lambda: _verify(argv[1:]))
    return run_command(PROG, lambda: _convert(argv), resumable=True)


if __name__ == "__main__":
    sys.exit(main())
