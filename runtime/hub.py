"""``flashmoe-pull ORG/NAME``: download a published layout from the Hub and verify it before use.

The index is fetched first; then exactly the files it lists (layer files, dense file, copied files),
nothing else (never code: nothing from a repo is executed), pinned to the index's commit. The
download is resumable and honours ``HF_HUB_OFFLINE``. After the first full verification (sizes and
every checksum of the index) a marker keyed by the snapshot's commit, the index digest and every
listed file's size, mtime, ctime and inode is cached, so later runs do not re-hash hundreds of GB;
any change re-verifies. ctime cannot be set back from user space, so bytes rewritten in place with
the mtime restored still count as a change; the copied files (config, tokenizer, chat template) are
re-hashed on every use anyway (they are small).

A rank of a pipelined run pulls part of a layout (``layers``): the index, the dense file (one file,
which every rank needs: its shared weights and its own layers' dense tensors are in it), the copied
files and the layer files of its own MoE layers, verified the same way under a marker of its own.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from collections.abc import Collection
from pathlib import Path

from ..cli import command
from ..fileio import atomic_write
from ..hubio import (
    HubError,
    check_repo_id,
    hub_error_message,
    progress_bars,
)
from ..layouts import (
    CODE_PATTERNS,
    INDEX_FILE,
    Index,
    LayoutError,
    cache_snapshot,
    listed_files,
    read_index,
)

PROG = "flashmoe-pull"
MARKER_VERSION = 2

__all__ = ["main", "pull"]


def _download(repo_id: str, revision, local_dir, token, progress: bool, names: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        with progress_bars(progress):
            path = snapshot_download(
                repo_id,
                revision=revision,
                local_dir=local_dir,
                token=token,
                allow_patterns=[glob.escape(n) for n in names],
                ignore_patterns=list(CODE_PATTERNS),
            )
    except Exception as e:  # huggingface_hub and httpx raise many types: report one line
        raise HubError(_pull_error(e, repo_id, revision)) from None
    return Path(path)


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | None = None,
    verify: bool = True,
    progress: bool = True,
    layers: Collection[int] | None = None,
) -> Path:
    """Download the layout ``repo_id`` (at ``revision``) and return its local directory.

    Into the Hugging Face cache by default, or into ``local_dir``: the index, then only the files
    it lists (with ``layers``, only the layer files of those MoE layers: a rank's part). With
    ``verify`` what was pulled is checked against the index (sizes and checksums) unless a
    previous run already verified this exact snapshot (or part). Raises HubError / LayoutError
    with a one-line message.
    """
    check_repo_id(repo_id)
    root = _download(repo_id, revision, local_dir, token, progress, [INDEX_FILE])
    if not (root / INDEX_FILE).is_file():
        raise HubError(f"{repo_id}: not a flashmoe layout (the repo has no {INDEX_FILE})")
    index = read_index(root)
    for f in [index.dense, *index.files]:
        if f.sha256 is None:  # the index is the trust root: all it lists must be checksummed
            raise HubError(f"{repo_id}: {INDEX_FILE} lists {f.name} without a sha256")
    snapshot = cache_snapshot(root)
    commit = snapshot.commit if snapshot else revision  # the index's commit
    _download(repo_id, commit, local_dir, token, progress, _part(index, layers))
    if verify:
        verify_once(root, progress=progress, layers=layers)
    else:
        read_index(root)
    return root


def _part(index: Index, layers: Collection[int] | None) -> list[str]:
    """The files a reader of ``layers`` (None: all) needs, in ``listed_files`` order."""
    if layers is None:
        return listed_files(index)
    unknown = set(layers) - {e.layer for e in index.layers}
    if unknown:
        raise LayoutError(f"{INDEX_FILE}: lists no MoE layer {min(unknown)}")
    skipped = {e.file for e in index.layers if e.layer not in layers}
    return [name for name in listed_files(index) if name not in skipped]


def _pull_error(e: Exception, repo_id: str, revision: str | None) -> str:
    from huggingface_hub.errors import LocalEntryNotFoundError, RevisionNotFoundError

    if isinstance(e, RevisionNotFoundError):
        return f"{repo_id}: revision {revision or 'main'!r} not found"
    if isinstance(e, LocalEntryNotFoundError) or type(e).__name__ == "IncompleteSnapshotError":
        return (
            f"{repo_id}: not (completely) in the local cache and the Hub cannot be used "
            f"(HF_HUB_OFFLINE=1 or no connection)"
        )
    return hub_error_message(e, repo_id)


# ----------------------------------------------------------------------------- verification marker
def _marker_path(root: Path, layers: Collection[int] | None = None) -> Path:
    part = ""
    if layers is not None:  # a rank's part: its own marker, named by its layers
        part = "-layers-" + hashlib.sha256(repr(sorted(set(layers))).encode()).hexdigest()[:16]
    snapshot = cache_snapshot(root)
    if snapshot is not None:
        return snapshot.repo_dir / ".flashmoe" / f"verified-{snapshot.commit}{part}.json"
    return Path(os.path.realpath(root)) / ".cache" / "flashmoe" / f"verified{part}.json"


def _fingerprint(root: Path, layers: Collection[int] | None = None) -> dict:
    """Commit, index digest and (size, mtime, ctime, inode) of every file the index names (with
    ``layers``, of those a reader of these MoE layers needs)."""
    index = read_index(root)  # also confines every name to the layout (safe_relative_path)
    files = {}
    for name in _part(index, layers)[1:]:
        try:
            st = os.stat(root / name)
        except FileNotFoundError:
            return {}
        files[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    snapshot = cache_snapshot(root)
    return {
        "version": MARKER_VERSION,
        "commit": snapshot.commit if snapshot else None,
        "index_sha256": hashlib.sha256((root / INDEX_FILE).read_bytes()).hexdigest(),
        "files": files,
    }


def is_verified(root: str | os.PathLike, layers: Collection[int] | None = None) -> bool:
    """Whether this exact snapshot (the part of ``layers``) already passed a full verification,
    unchanged since (and its copied files, re-hashed now, still match the index)."""
    from ..verify import check_copied_files

    root = Path(root)
    if layers is not None and is_verified(root):  # the whole layout, pulled and verified before
        return True
    try:
        marker = json.loads(_marker_path(root, layers).read_text())
    except (OSError, ValueError):
        return False
    current = _fingerprint(root, layers)
    if not current or marker != current:
        return False
    try:
        check_copied_files(root, read_index(root))
    except (LayoutError, OSError):
        return False
    return True


def verify_once(
    root: str | os.PathLike, *, progress: bool = False, layers: Collection[int] | None = None
) -> None:
    """Verify the layout at ``root`` (sizes and checksums; with ``layers``, the part a reader of
    those MoE layers needs) unless already verified as it is now."""
    from ..verify import verify_layout

    root = Path(root)
    if is_verified(root, layers):
        return
    # a rank's part is checked without a bar, as before
    verify_layout(root, checksums=True, progress=progress and layers is None, layers=layers)
    marker = _marker_path(root, layers)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, json.dumps(_fingerprint(root, layers)))
    except OSError:
        pass  # read-only cache: verify again next time


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Download a flashmoe layout from the Hugging Face Hub and verify it "
        "(sizes and checksums) before first use. Prints the local directory.",
    )
    p.add_argument("repo_id", metavar="ORG/NAME", help="Hub model repo of a published layout")
    p.add_argument("--local-dir", default=None, metavar="D", help="download here, not to the cache")
    p.add_argument("--revision", default=None, metavar="R", help="branch, tag or commit")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum verification")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@command(PROG, resumable=True)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = pull(
        args.repo_id,
        revision=args.revision,
        local_dir=args.local_dir,
        verify=not args.no_verify,
        progress=not args.quiet,
    )
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
