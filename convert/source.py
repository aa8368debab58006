"""Where a conversion's input comes from: a local directory or a Hugging Face Hub repo."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..hubio import error_line, is_repo_id, progress_bars
from ..layouts import cache_snapshot, copied_files
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


@dataclass
class Source:
    path: Path  # local directory holding the checkpoint
    repo_id: str | None
    revision: str | None
    from_hub: bool


def aux_files(directory: Path) -> list[str]:
    """The files of ``directory`` a layout copies (FORMAT.md), in the layout's order."""
    return copied_files(p.name for p in directory.iterdir() if p.is_file())


def _hub_origin(directory: Path) -> tuple[str | None, str | None]:
    """``(repo_id, revision)`` if ``directory`` is a snapshot in a Hugging Face cache."""
    snapshot = cache_snapshot(directory)
    return (snapshot.repo_id, snapshot.commit) if snapshot else (None, None)


def resolve_source(src: str | os.PathLike, revision: str | None, progress: bool) -> Source:
    """Find (or download) the checkpoint ``src`` names."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ConvertError(path, "not a directory")
        repo_id, cached_rev = _hub_origin(path)
        return Source(path, repo_id, revision or cached_rev, False)
    if not is_repo_id(str(src)):
        raise ConvertError(src, "no such directory (and not a Hugging Face repo id)")
    return _download(str(src), revision, progress)


def _download(repo_id: str, revision: str | None, progress: bool) -> Source:
    from huggingface_hub import snapshot_download

    try:
        with progress_bars(progress):
            local = snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS)
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = " (HF_HUB_OFFLINE is set and the repo is not fully cached)" if offline else ""
        raise ConvertError(
            repo_id, f"download failed{hint}: {type(e).__name__}: {error_line(e)}"
        ) from None
    path = Path(local)
    _, cached_rev = _hub_origin(path)
    return Source(path, repo_id, cached_rev or revision, True)
