"""What a layout directory (or Hub repo) holds and how its files are named (FORMAT.md)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import LayoutError
from .hfcache import cache_snapshot

if TYPE_CHECKING:
    from .index import Index

INDEX_FILE = "flashmoe-index.json"
DENSE_FILE = "model-dense.safetensors"
EXPERTS_DIR = "experts"
CARD_FILE = "README.md"  # the model card: not in the index; readers ignore it

# Copied from the source when it has them, in this order, then any "*.tiktoken" (sorted).
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
COPIED_SUFFIX = ".tiktoken"
# A layout the runtime can load lists one of these (or a "*.tiktoken").
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# Never fetched from a layout repo, whatever its index lists: a layout holds no code.
CODE_PATTERNS = ("*.py", "*.pyc", "*.pyo", "*.so", "*.dylib", "*.dll", "*.sh", "*.exe")


def layer_file(layer: int) -> str:
    """The name of MoE layer ``layer``'s file: ``experts/layer-NNN.bin`` (at least 3 digits)."""
    return f"{EXPERTS_DIR}/layer-{layer:03d}.bin"


def copied_files(names: Iterable[str]) -> list[str]:
    """Which of a source directory's file ``names`` a layout copies, in the layout's order."""
    present = set(names)
    copied = [n for n in COPIED_FILES if n in present]
    return copied + sorted(n for n in present if n.endswith(COPIED_SUFFIX))


def listed_files(index: Index) -> list[str]:
    """Every file a reader uses: the index, the dense file, the layer files, the copied files."""
    return [INDEX_FILE, index.dense.name, *(e.file for e in index.layers)] + [
        f.name for f in index.files
    ]


def lists_tokenizer(names: Iterable[str]) -> bool:
    """Whether the copied ``names`` include a tokenizer the runtime can load."""
    return any(n in TOKENIZER_FILES or n.endswith(COPIED_SUFFIX) for n in names)


def safe_relative_path(root: Path, name: str, what: str = "file") -> Path:
    """Resolve ``name`` under ``root``, refusing absolute paths, ``..`` and symlinks that leave it
    (except, in a Hugging Face cache snapshot, symlinks into the repo's ``blobs``)."""
    ok = isinstance(name, str) and name and "\0" not in name and "\\" not in name
    parts = name.split("/") if ok else []
    if not ok or name.startswith("/") or any(part in ("..", ".", "") for part in parts):
        raise LayoutError(f"{root / INDEX_FILE}: {what} name {name!r} is not a plain relative path")
    full = root.joinpath(*parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
        snapshot = cache_snapshot(real_root)
        blobs = str(snapshot.blobs) if snapshot is not None else None
        if blobs is None or os.path.commonpath([blobs, real]) != blobs:
            raise LayoutError(f"{root / INDEX_FILE}: {what} {name!r} resolves outside the layout")
    return full
