"""Read a safetensors checkpoint's shard headers and check them against the files.

Nothing here loads tensor data: a checkpoint is a set of byte ranges, each validated against
its shard's size, so that a shard that is missing, truncated or whose header lies is reported
before a single byte is copied.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..layouts.dtypes import SIZES as DTYPE_SIZES
from .errors import ConvertError

INDEX_JSON = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: where its bytes are (absolute offsets in ``file``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str  # shard file name, relative to the checkpoint directory
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ShardFile:
    name: str
    size: int
    mtime_ns: int


@dataclass
class Checkpoint:
    """A checkpoint directory: its config, shards and tensors."""

    path: Path
    config: dict
    shards: list[ShardFile]
    tensors: dict[str, TensorInfo]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(path, f"unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(path, "not a JSON object")
    return data


def read_header(path: Path, size: int) -> tuple[int, dict]:
    """``(data_start, header)`` of one shard; ConvertError if the header is not valid."""
    if size < 8:
        raise ConvertError(path, f"truncated: {size} bytes, too short for a safetensors header")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise ConvertError(path, f"header length {n} is implausible (not a safetensors file?)")
        if 8 + n > size:
            raise ConvertError(path, f"truncated: header of {n} bytes does not fit in {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(path, "header is not a JSON object")
    return 8 + n, header


def parse_shard(directory: Path, name: str) -> tuple[ShardFile, list[TensorInfo]]:
    """Parse one shard's header and check every tensor's byte range against the file."""
    path = directory / name
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConvertError(path, "missing shard") from None
    data_start, header = read_header(path, st.st_size)
    tensors = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ConvertError(path, f"tensor {key}: malformed header entry {meta!r}") from None
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise ConvertError(path, f"tensor {key}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
            raise ConvertError(path, f"tensor {key}: bad shape {shape!r}")
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end):
            raise ConvertError(path, f"tensor {key}: bad data_offsets [{begin}, {end}]")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise ConvertError(
                path,
                f"tensor {key}: data_offsets [{begin}, {end}] hold {end - begin} bytes, "
                f"but {dtype}{shape} needs {expected}",
            )
        tensors.append(
            TensorInfo(key, dtype, tuple(shape), name, data_start + begin, data_start + end)
        )
    tensors.sort(key=lambda t: (t.start, t.end))
    for a, b in zip(tensors, tensors[1:], strict=False):
        if b.start < a.end:
            raise ConvertError(path, f"tensors {a.name} and {b.name} overlap in the header")
    if tensors and tensors[-1].end > st.st_size:
        last = tensors[-1]
        raise ConvertError(
            path,
            f"truncated: {st.st_size} bytes, but tensor {last.name} ends at byte {last.end}",
        )
    return ShardFile(name, st.st_size, st.st_mtime_ns), tensors


def shard_names(directory: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard files of a checkpoint and its weight map (None for a single-file checkpoint)."""
    index_path = directory / INDEX_JSON
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(index_path, "no weight_map")
        names = sorted(set(weight_map.values()))
        for n in names:
            if not isinstance(n, str) or "/" in n or "\\" in n or n in ("", ".", ".."):
                raise ConvertError(index_path, f"shard name {n!r} is not a plain file name")
        return names, weight_map
    if (directory / SINGLE_FILE).is_file():
        return [SINGLE_FILE], None
    raise ConvertError(directory, f"no {INDEX_JSON} or {SINGLE_FILE}: not a safetensors checkpoint")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read config.json and every shard header of the checkpoint at ``path``, validating them."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConvertError(directory, "not a directory")
    config = read_json(directory / "config.json")
    names, weight_map = shard_names(directory)
    shards, tensors = [], {}
    for name in names:
        shard, infos = parse_shard(directory, name)
        shards.append(shard)
        for t in infos:
            if t.name in tensors:
                raise ConvertError(
                    directory / name, f"tensor {t.name} is also in {tensors[t.name].file}"
                )
            tensors[t.name] = t
    if weight_map is not None:
        for key, file in weight_map.items():
            t = tensors.get(key)
            if t is None or t.file != file:
                raise ConvertError(
                    directory / file, f"tensor {key} listed in {INDEX_JSON} is not in its header"
                )
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise ConvertError(
                directory / tensors[extra[0]].file,
                f"tensor {extra[0]} is not listed in {INDEX_JSON}",
            )
    return Checkpoint(directory, config, shards, tensors)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
