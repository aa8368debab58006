"""A Hub checkpoint without its data: the safetensors headers as sparse shard files.

``get_safetensors_metadata`` (huggingface_hub: HTTP range requests) gives every shard's tensors;
each is written as a file of the shard's real size whose header has the real length and whose data
is a hole, so tensor offsets are the real ones. The converter's own code then reads the replica as
it reads a download: ``open_checkpoint`` checks it, mlx-lm lazily loads it (MLX maps tensors, it
reads none) and ``plan_experts`` finds the experts.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..hubio import hub_error_message, progress_bars
from .errors import ConvertError
from .safetensors_source import INDEX_JSON, SINGLE_FILE


@dataclass
class RemoteFile:
    size: int
    sha256: str | None  # LFS files only (the blob name in the Hub cache)


def _fail(repo_id: str, e: Exception) -> ConvertError:
    msg = hub_error_message(e, repo_id).removeprefix(f"{repo_id}: ")
    return ConvertError(repo_id, msg)


def list_files(repo_id: str, revision: str | None) -> dict[str, RemoteFile]:
    """The top-level files of ``repo_id`` with their sizes; ConvertError (one line) on failure."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = HfApi().list_repo_tree(repo_id, revision=revision)
        files = {
            f.path: RemoteFile(f.size, f.lfs.sha256 if f.lfs else None)
            for f in tree
            if isinstance(f, RepoFile)
        }
    except Exception as e:  # huggingface_hub raises many types; all mean "could not read it"
        raise _fail(repo_id, e) from None
    if INDEX_JSON not in files and SINGLE_FILE not in files:
        raise ConvertError(
            repo_id, f"no {INDEX_JSON} or {SINGLE_FILE}: not a safetensors checkpoint"
        )
    if "config.json" not in files:
        raise ConvertError(repo_id, "no config.json")
    return files


def _write_sparse_shard(path: Path, tensors: dict, metadata: dict | None, size: int) -> bool:
    """A safetensors file of ``size`` bytes, the real header and a hole for the data; False when
    the header cannot be given its real length (the offsets are then not the real ones)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    end = 0
    for name, t in tensors.items():
        header[name] = {"dtype": t.dtype, "shape": t.shape, "data_offsets": list(t.data_offsets)}
        end = max(end, t.data_offsets[1])
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    real = size - 8 - end  # safetensors: 8-byte length, header, data to the end of the file
    exact = len(raw) <= real
    raw += b" " * ((real - len(raw)) if exact else -len(raw) % 8)
    path.unlink(missing_ok=True)  # never write through a link
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + end)
    return exact


def write_replica(
    repo_id: str,
    revision: str | None,
    files: dict[str, RemoteFile],
    into: Path,
    progress: bool,
    small_files: Path | None = None,
) -> list[str]:
    """Write the sparse shards and weight index of ``repo_id`` into ``into``, with config.json
    (fetched) or the files of ``small_files`` (a snapshot: linked). Returns the shards whose
    header could not be given its real length."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        with progress_bars(progress):
            meta = HfApi().get_safetensors_metadata(repo_id, revision=revision)
            if small_files is None:
                config = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as e:  # huggingface_hub raises many types; all mean "could not read it"
        raise _fail(repo_id, e) from None
    if small_files is None:
        shutil.copyfile(config, into / "config.json")
    else:
        for p in small_files.iterdir():
            # not a cached shard: its replica is written below, and through a link it would
            # overwrite the Hub cache's blob
            if p.is_file() and p.name not in meta.files_metadata and not (into / p.name).exists():
                os.symlink(p.resolve(), into / p.name)
    inexact = []
    for name, fm in meta.files_metadata.items():
        if "/" in name or name in ("", ".", ".."):
            raise ConvertError(repo_id, f"shard name {name!r} is not a plain file name")
        size = files[name].size if name in files else 0
        if not _write_sparse_shard(into / name, fm.tensors, fm.metadata, size):
            inexact.append(name)
    if meta.sharded and not (into / INDEX_JSON).exists():
        index = {"metadata": meta.metadata or {}, "weight_map": meta.weight_map}
        (into / INDEX_JSON).write_text(json.dumps(index))
    return inexact
