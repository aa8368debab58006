"""Shared helpers for the benchmark subcommands: argument lists, tables, JSON output, layouts."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

# The fixed prompt of decode benchmarks (about 150 tokens with the synthetic tokenizer).
DEFAULT_PROMPT = (
    "Mixture of experts models route each token to a few experts out of many. Streaming the "
    "routed experts from a solid state disk lets a machine run a model larger than its memory, "
    "as long as the disk is fast and the expert cache is good."
)


class BenchError(ValueError):
    """A user-facing error: printed as one line ``flashmoe-bench: error: ...`` (``flashmoe.cli``)."""


def int_list(text: str) -> list[int]:
    """``"1-8"``, ``"1,2,4"`` or ``"1-4,8"`` -> list of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError(f"empty list: {text!r}")
    return out


def command_line() -> str:
    """The command as typed (``flashmoe-bench ...``), for results files."""
    return "flashmoe-bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


OUT_DIR = Path("flashmoe-bench-out")  # in the working directory, never inside the package


def output_path(arg: str | None, kind: str) -> Path:
    """``--json`` or ``flashmoe-bench-out/<kind>-<time>.json``."""
    if arg:
        return Path(arg)
    return OUT_DIR / time.strftime(f"{kind}-%Y%m%d-%H%M%S.json")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += [
        "| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in r) + " |" for r in rows
    ]
    return "\n".join(lines)


def layout_files_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


def open_layout(path: str):
    """(index, layout directory) or BenchError."""
    from ..layouts import INDEX_FILE, LayoutError, read_index

    root = Path(path)
    if not (root / INDEX_FILE).exists():
        raise BenchError(f"{path}: not a flashmoe layout (no {INDEX_FILE})")
    try:
        return read_index(root), root
    except (LayoutError, ValueError, OSError) as e:
        raise BenchError(f"{path}: {e}") from None


def source_of(index, given: str | None) -> Path | None:
    """The source checkpoint for the mlx-lm comparison: ``--source`` or the index's source path."""
    if given:
        p = Path(given)
        if not (p / "config.json").exists():
            raise BenchError(f"{given}: not a checkpoint directory (no config.json)")
        return p
    src = getattr(index, "source", None)
    path = src.get("path") if isinstance(src, dict) else getattr(src, "path", None)
    if path and (Path(path) / "config.json").exists():
        return Path(path)
    return None
