"""Where a conversion's input comes from: a local directory or a Hugging Face Hub repo."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConvertError

# What mlx_lm.load fetches, minus remote code (*.py), plus the README for the license.
ALLOW_PATTERNS = [
    "*.json",
    "model*.safetensors",
    "tokenizer.model",
    "*.tiktoken",
    "*.txt",
    "*.jinja",
    "README.md",
]
# Files copied into the layout when the source has them (FORMAT.md). Never *.py.
AUX_FILES = (
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
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CACHE_SNAPSHOT = re.compile(
    r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<rev>[0-9a-f]{40})$"
)


@dataclass
class Source:
    path: Path  # local directory holding the checkpoint
    repo_id: str | None
    revision: str | None
    from_hub: bool


def aux_files(directory: Path) -> list[str]:
    names = [n for n in AUX_FILES if (directory / n).is_file()]
    names += sorted(p.name for p in directory.glob("*.tiktoken") if p.is_file())
    return names


def cached_sha256(path: Path) -> str | None:
    """The sha256 of a file in a Hugging Face cache snapshot, read off its blob's name (LFS files)."""
    if not path.is_symlink():
        return None
    name = os.path.basename(os.readlink(path))
    return name if _SHA256.match(name) else None


def _hub_origin(directory: Path) -> tuple[str | None, str | None]:
    """``(repo_id, revision)`` if ``directory`` is a snapshot in a Hugging Face cache."""
    m = _CACHE_SNAPSHOT.search(str(directory.resolve()).replace(os.sep, "/"))
    if m is None:
        return None, None
    return f"{m['org']}/{m['name']}", m["rev"]


def resolve_source(src: str | os.PathLike, revision: str | None, progress: bool) -> Source:
    """Find (or download) the checkpoint ``src`` names."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ConvertError(path, "not a directory")
        repo_id, cached_rev = _hub_origin(path)
        return Source(path, repo_id, revision or cached_rev, False)
    if not _REPO_ID.match(str(src)):
        raise ConvertError(src, "no such directory (and not a Hugging Face repo id)")
    return _download(str(src), revision, progress)


def _download(repo_id: str, revision: str | None, progress: bool) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set and the repo is not fully cached)" if offline else ""
        raise ConvertError(repo_id, f"download failed{hint}: {type(e).__name__}: {msg}") from None
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    path = Path(local)
    _, cached_rev = _hub_origin(path)
    return Source(path, repo_id, cached_rev or revision, True)
