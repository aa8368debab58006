"""The layout index (``flashmoe-index.json``): schema, reading, writing and validation.

See FORMAT.md next to this file for the specification this module implements.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .families import COMPONENTS
from .plan import check_alignment, record_size, split_plan

FORMAT_NAME = "flashmoe-layout"
FORMAT_VERSION = 1
INDEX_FILE = "flashmoe-index.json"
DENSE_FILE = "model-dense.safetensors"
EXPERTS_DIR = "experts"
CHECKSUM_ALGORITHM = "sha256"


class LayoutError(ValueError):
    """A layout that is missing, incomplete, corrupt or from an unknown format version."""


@dataclass
class Component:
    """One of the nine tensors of an expert record."""

    name: str  # e.g. "gate_proj.weight"
    dtype: str  # safetensors dtype: "U32", "BF16", "F16", "F32", ...
    shape: list[int]  # per-expert shape (the stacked tensor's shape without axis 0)
    offset: int  # byte offset inside the record
    nbytes: int
    bits: int
    group_size: int
    mode: str


@dataclass
class LayerFile:
    layer: int  # decoder layer index in the model
    file: str  # path relative to the layout directory, "/"-separated
    size: int  # bytes: num_experts * record_size
    source_prefix: str  # checkpoint key prefix, e.g. "language_model.model.layers.3.mlp"
    checksums: list[str]  # one hex digest per expert record (over expert_bytes, not padding)


@dataclass
class FileEntry:
    name: str
    size: int
    sha256: str | None = None


@dataclass
class Index:
    model_type: str
    config: dict
    num_experts: int
    top_k: int
    alignment: int
    expert_bytes: int
    record_size: int
    components: list[Component]
    layers: list[LayerFile]
    dense: FileEntry
    files: list[FileEntry]  # copied auxiliary files (config, tokenizer, ...)
    source: dict
    split_plans: dict[str, list[list[int]]]
    checksum: str = CHECKSUM_ALGORITHM
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    created_by: str = field(default="")

    def layer(self, layer: int) -> LayerFile:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise KeyError(layer)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> Index:
        d = dict(d)
        d["components"] = [Component(**c) for c in d["components"]]
        d["layers"] = [LayerFile(**entry) for entry in d["layers"]]
        d["dense"] = FileEntry(**d["dense"])
        d["files"] = [FileEntry(**f) for f in d["files"]]
        return cls(**d)


def safe_relative_path(root: Path, name: str, what: str = "file") -> Path:
    """Resolve ``name`` under ``root``, refusing absolute paths, ``..`` and symlinks that leave it."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or "\\" in name or any(part in ("..", "") for part in p.parts):
        raise LayoutError(f"{root / INDEX_FILE}: {what} name {name!r} is not a plain relative path")
    full = root.joinpath(*p.parts)
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
        blobs = _hf_cache_blobs(real_root)
        if blobs is None or os.path.commonpath([blobs, real]) != blobs:
            raise LayoutError(f"{root / INDEX_FILE}: {what} {name!r} resolves outside the layout")
    return full


def _hf_cache_blobs(real_root: str) -> str | None:
    """The ``blobs`` folder of the Hugging Face cache repo when ``real_root`` is one of its snapshots.

    A snapshot (``models--ORG--NAME/snapshots/COMMIT``) holds symlinks to ``../../blobs/ETAG``,
    which are the only targets outside the layout directory allowed.
    """
    parent = os.path.dirname(real_root)
    if os.path.basename(parent) != "snapshots":
        return None
    blobs = os.path.join(os.path.dirname(parent), "blobs")
    return blobs if os.path.isdir(blobs) else None


def validate(index: Index, where: str) -> None:
    """Check the index's internal consistency; raise LayoutError naming ``where``."""

    def bad(msg: str) -> LayoutError:
        return LayoutError(f"{where}: {msg}")

    try:
        check_alignment(index.alignment)
    except ValueError as e:
        raise bad(str(e)) from None
    if index.record_size != record_size(index.expert_bytes, index.alignment):
        raise bad(f"record_size {index.record_size} is not expert_bytes rounded to alignment")
    names = [c.name for c in index.components]
    if names != list(COMPONENTS):
        raise bad(f"components must be {list(COMPONENTS)} in that order, got {names}")
    offset = 0
    for c in index.components:
        if c.offset != offset or c.nbytes <= 0:
            raise bad(f"component {c.name} has offset {c.offset}, expected {offset}")
        offset += c.nbytes
    if offset != index.expert_bytes:
        raise bad(f"components add up to {offset} bytes, expert_bytes is {index.expert_bytes}")
    if not 1 <= index.top_k <= index.num_experts:
        raise bad(f"top_k {index.top_k} is not in 1..num_experts ({index.num_experts})")
    if not index.layers:
        raise bad("no MoE layers")
    for entry in index.layers:
        if entry.size != index.num_experts * index.record_size:
            raise bad(f"layer {entry.layer}: size {entry.size} != num_experts * record_size")
        if len(entry.checksums) != index.num_experts:
            raise bad(
                f"layer {entry.layer}: {len(entry.checksums)} checksums for {index.num_experts} experts"
            )
    for n, plan in index.split_plans.items():
        expected = [list(r) for r in split_plan(index.expert_bytes, index.alignment, int(n))]
        if plan != expected:
            raise bad(f"split plan {n} does not follow the rule in FORMAT.md")


def read_index(root: str | os.PathLike) -> Index:
    """Load and validate the index of the layout at ``root``; LayoutError on any problem."""
    root = Path(root)
    path = root / INDEX_FILE
    if not root.is_dir():
        raise LayoutError(f"{root}: not a directory")
    if not path.is_file():
        raise LayoutError(
            f"{path}: missing (not a flashmoe layout, or its conversion did not finish)"
        )
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LayoutError(f"{path}: unreadable index ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise LayoutError(f"{path}: not a {FORMAT_NAME} index")
    if raw.get("version") != FORMAT_VERSION:
        raise LayoutError(
            f"{path}: format version {raw.get('version')!r} is not supported "
            f"(this flashmoe reads version {FORMAT_VERSION})"
        )
    try:
        index = Index.from_dict(raw)
    except (TypeError, KeyError) as e:
        raise LayoutError(f"{path}: malformed index ({e})") from None
    validate(index, str(path))
    for entry in index.layers:
        safe_relative_path(root, entry.file, "layer file")
    safe_relative_path(root, index.dense.name, "dense file")
    for f in index.files:
        safe_relative_path(root, f.name, "file")
    return index


def write_index(root: str | os.PathLike, index: Index) -> None:
    """Write the index atomically (temporary name, fsync, rename): the last step of a conversion."""
    root = Path(root)
    validate(index, str(root / INDEX_FILE))
    tmp = root / (INDEX_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(index.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / INDEX_FILE)
