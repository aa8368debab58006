"""The Hugging Face cache's folder layout, which a layout may live in (FORMAT.md, "Paths").

A downloaded repo is ``<cache>/models--ORG--NAME/`` with ``snapshots/<commit>/`` holding symlinks
to ``../../blobs/<etag>``; an LFS file's etag is its sha256.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CacheSnapshot:
    """One snapshot folder of a Hugging Face cache."""

    repo_dir: Path  # <cache>/models--ORG--NAME (real path)
    repo_id: str  # ORG/NAME
    commit: str  # 40 hex digits: the snapshot folder's name

    @property
    def blobs(self) -> Path:
        return self.repo_dir / "blobs"


def cache_snapshot(path: str | os.PathLike) -> CacheSnapshot | None:
    """The snapshot ``path`` is (after resolving symlinks), or None if it is not one."""
    real = Path(os.path.realpath(path))
    snapshots, repo_dir = real.parent, real.parent.parent
    parts = repo_dir.name.split("--")
    if (
        snapshots.name != "snapshots"
        or not _COMMIT.fullmatch(real.name)
        or parts[0] != "models"
        or len(parts) not in (2, 3)
        or not all(parts[1:])
    ):
        return None
    return CacheSnapshot(repo_dir, "/".join(parts[1:]), real.name)


def blob_sha256(path: str | os.PathLike) -> str | None:
    """The sha256 of a snapshot file, read off the name of the blob it links to (LFS files only)."""
    if not os.path.islink(path):
        return None
    name = os.path.basename(os.readlink(path))
    return name if _SHA256.fullmatch(name) else None
