"""The layout index (``flashmoe-index.json``): schema, reading, writing and validation.

See FORMAT.md next to this file for the specification this module implements.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .dtypes import COMPONENT_DTYPES, SIZES
from .errors import LayoutError
from .families import (
    COMPONENTS,
    GLU_PROJECTIONS,
    MLP_PROJECTIONS,
    MODES,
    RECORD_PARTS,
    text_config,
)
from .naming import DENSE_FILE, INDEX_FILE, safe_relative_path
from .plan import MAX_SPLIT, check_alignment, record_size, split_plan

FORMAT_NAME = "flashmoe-layout"
FORMAT_VERSION = 2  # the newest version written; a record that version 1 can hold is written as 1
READ_VERSIONS = (1, 2)
CHECKSUM_ALGORITHM = "sha256"


@dataclass
class Component:
    """One of the nine tensors of an expert record."""

    name: str  # e.g. "gate_proj.weight"
    dtype: str  # safetensors dtype: "U32", "U8", "BF16", "F16", "F32"
    shape: list[int]  # per-expert shape (the stacked tensor's shape without axis 0; [] a scalar)
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
        """Build from parsed JSON; ValueError naming an unknown, missing or mistyped key."""
        d = _fields(cls, d, "index")
        for key in ("components", "layers", "files"):
            if not isinstance(d[key], list):
                raise ValueError(f"{key} must be a list")
        d["components"] = [
            Component(**_fields(Component, c, f"components[{i}]"))
            for i, c in enumerate(d["components"])
        ]
        d["layers"] = [
            LayerFile(**_fields(LayerFile, e, f"layers[{i}]")) for i, e in enumerate(d["layers"])
        ]
        d["dense"] = FileEntry(**_fields(FileEntry, d["dense"], "dense"))
        d["files"] = [
            FileEntry(**_fields(FileEntry, f, f"files[{i}]")) for i, f in enumerate(d["files"])
        ]
        return cls(**d)


def _fields(cls, d, where: str) -> dict:
    """``d`` checked against the dataclass ``cls``: an object with no unknown or missing keys."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    required = known  # a writer always writes every key (asdict); sha256 may be null
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}")
    return dict(d)


DTYPE_SIZES = {name: SIZES[name] for name in COMPONENT_DTYPES}
_HEX = set("0123456789abcdef")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_types(index: Index) -> str | None:
    """The first field whose JSON type is wrong, described; None when every type is right."""
    for name in ("num_experts", "top_k", "alignment", "expert_bytes", "record_size"):
        if not _is_int(getattr(index, name)):
            return f"{name} must be an integer"
    if not _is_int(index.version) or index.version not in READ_VERSIONS:
        return f"version {index.version!r} is not one of {list(READ_VERSIONS)}"
    if not isinstance(index.config, dict) or not isinstance(index.model_type, str):
        return "config must be an object and model_type a string"
    for c in index.components:
        if not isinstance(c.name, str):
            return f"component name {c.name!r} must be a string"
        if not isinstance(c.dtype, str) or c.dtype not in DTYPE_SIZES:
            return f"component {c.name!r}: dtype {c.dtype!r} is not one of {sorted(DTYPE_SIZES)}"
        if not (isinstance(c.shape, list) and all(_is_int(d) and d > 0 for d in c.shape)):
            return f"component {c.name!r}: shape {c.shape!r} must be a list of positive integers"
        if not (all(_is_int(v) for v in (c.offset, c.nbytes, c.bits, c.group_size))):
            return f"component {c.name!r}: offset, nbytes, bits and group_size must be integers"
        if not isinstance(c.mode, str):
            return f"component {c.name!r}: mode must be a string"
    for entry in index.layers:
        if not (
            _is_int(entry.layer)
            and isinstance(entry.file, str)
            and _is_int(entry.size)
            and isinstance(entry.source_prefix, str)
            and isinstance(entry.checksums, list)
            and all(_is_hex64(h) for h in entry.checksums)
        ):
            return f"layer entry {entry.layer!r} is malformed"
    for f in [index.dense, *index.files]:
        if not (isinstance(f.name, str) and _is_int(f.size) and f.size >= 0):
            return f"file entry {f.name!r} is malformed"
        if f.sha256 is not None and not _is_hex64(f.sha256):
            return f"file entry {f.name!r}: sha256 must be 64 lowercase hex digits"
    if not isinstance(index.split_plans, dict):
        return "split_plans must be an object"
    for n, plan in index.split_plans.items():
        if not isinstance(plan, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) for r in plan
        ):
            return f"split plan {n!r} must be a list of [start, end] integer pairs"
    if index.checksum != CHECKSUM_ALGORITHM:
        return f"checksum must be {CHECKSUM_ALGORITHM!r}"
    if not isinstance(index.created_by, str):
        return "created_by must be a string"
    if not isinstance(index.source, dict):
        return "source must be an object"
    return None


def _is_hex64(h) -> bool:
    return isinstance(h, str) and len(h) == 64 and set(h) <= _HEX


def _check_config(index: Index) -> str | None:
    """Where the index's config contradicts the index (model_type, num_experts, top_k)."""
    config = index.config
    if config.get("model_type") != index.model_type:
        return f"config model_type {config.get('model_type')!r} is not {index.model_type!r}"
    try:
        tc = text_config(config)
    except ValueError as e:
        return str(e)
    for key, value in (("num_experts", index.num_experts), ("num_experts_per_tok", index.top_k)):
        if key in tc and (not _is_int(tc[key]) or tc[key] != value):
            return f"config {key} {tc[key]!r} disagrees with the index ({value})"
    return None


_PART_DTYPES = {
    "weight": ("U32",),
    "scales": ("BF16", "F16", "F32"),  # affine; the fp modes store U8 scales
    "biases": ("BF16", "F16", "F32"),
    "global_scale": ("F32",),
    "bias": ("BF16", "F16", "F32"),
}


def record_version(components: list[Component]) -> int:
    """The oldest format version that can hold a record of ``components``."""
    v1 = [c.name for c in components] == list(COMPONENTS)
    return 1 if v1 and all(c.mode == "affine" for c in components) else 2


def check_components(components: list[Component], version: int) -> str | None:
    """Why ``components`` are not a valid record of format ``version`` (FORMAT.md), or None."""
    names = [c.name for c in components]
    if version == 1 and names != list(COMPONENTS):
        return f"components must be {list(COMPONENTS)} in that order, got {names}"
    projections = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    if projections not in (list(GLU_PROJECTIONS), list(MLP_PROJECTIONS)):
        return (
            f"component projections must be {list(GLU_PROJECTIONS)} or {list(MLP_PROJECTIONS)} "
            f"in that order, got {projections}"
        )
    for c in components:
        bits, sizes = MODES.get(c.mode, ((), ()))
        if (
            c.bits not in bits
            or not c.group_size > 0
            or (sizes is not None and c.group_size not in sizes)
            or (version == 1 and c.mode != "affine")
        ):
            return (
                f"component {c.name}: quantization mode={c.mode!r} bits={c.bits} "
                f"group_size={c.group_size} is not supported"
            )
    for proj in projections:
        mine = [c for c in components if c.name.rpartition(".")[0] == proj]
        parts = [c.name.rpartition(".")[2] for c in mine]
        head = mine[0]
        want = [p for p in RECORD_PARTS if p in ("weight", "scales") or p in parts]
        if (
            parts != want
            or ("biases" in parts) != (head.mode == "affine")
            or ("global_scale" in parts and head.mode != "nvfp4")
        ):
            return f"{proj} parts {parts} are not those of mode {head.mode!r} in record order"
        for c in mine:
            part = c.name.rpartition(".")[2]
            if (c.bits, c.group_size, c.mode) != (head.bits, head.group_size, head.mode):
                return f"component {c.name}: quantization differs from {head.name}"
            dtypes = _PART_DTYPES[part]
            if part == "scales" and c.mode != "affine":
                dtypes = ("U8",)
            if c.dtype not in dtypes or (part == "global_scale") != (c.shape == []):
                return f"component {c.name}: dtype {c.dtype} or shape {c.shape} is wrong for it"
    return None


def validate(index: Index, where: str) -> None:
    """Check the index's types and internal consistency; raise LayoutError naming ``where``."""

    def bad(msg: str) -> LayoutError:
        return LayoutError(f"{where}: {msg}")

    problem = _check_types(index) or _check_config(index)
    if problem:
        raise bad(problem)
    try:
        check_alignment(index.alignment)
    except ValueError as e:
        raise bad(str(e)) from None
    if index.record_size != record_size(index.expert_bytes, index.alignment):
        raise bad(f"record_size {index.record_size} is not expert_bytes rounded to alignment")
    problem = check_components(index.components, index.version)
    if problem:
        raise bad(problem)
    offset = 0
    for c in index.components:
        if c.offset != offset or c.nbytes <= 0:
            raise bad(f"component {c.name} has offset {c.offset}, expected {offset}")
        if math.prod(c.shape) * DTYPE_SIZES[c.dtype] != c.nbytes:
            raise bad(f"component {c.name}: shape {c.shape} of {c.dtype} is not {c.nbytes} bytes")
        offset += c.nbytes
    if offset != index.expert_bytes:
        raise bad(f"components add up to {offset} bytes, expert_bytes is {index.expert_bytes}")
    if not 1 <= index.top_k <= index.num_experts:
        raise bad(f"top_k {index.top_k} is not in 1..num_experts ({index.num_experts})")
    if not index.layers:
        raise bad("no MoE layers")
    numbers = [entry.layer for entry in index.layers]
    if numbers != sorted(set(numbers)) or numbers[0] < 0:
        raise bad(f"layers must be distinct and increasing, got {numbers}")
    for entry in index.layers:
        if entry.size != index.num_experts * index.record_size:
            raise bad(f"layer {entry.layer}: size {entry.size} != num_experts * record_size")
        if len(entry.checksums) != index.num_experts:
            raise bad(
                f"layer {entry.layer}: {len(entry.checksums)} checksums for {index.num_experts} experts"
            )
    if index.dense.name != DENSE_FILE:
        raise bad(f"dense file must be {DENSE_FILE!r}, got {index.dense.name!r}")
    expected_keys = [str(n) for n in range(1, MAX_SPLIT + 1)]
    if sorted(index.split_plans, key=lambda k: (len(k), k)) != expected_keys:
        raise bad(f"split_plans must have exactly the keys {expected_keys}")
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
    if not _is_int(raw.get("version")) or raw.get("version") not in READ_VERSIONS:
        raise LayoutError(
            f"{path}: format version {raw.get('version')!r} is not supported "
            f"(this flashmoe reads versions {', '.join(map(str, READ_VERSIONS))}; a newer "
            "flashmoe wrote it, or it is damaged)"
        )
    try:
        index = Index.from_dict(raw)
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise LayoutError(f"{path}: malformed index ({e})") from None
    validate(index, str(path))
    for entry in index.layers:
        safe_relative_path(root, entry.file, "layer file")
    safe_relative_path(root, index.dense.name, "dense file")
    for f in index.files:
        safe_relative_path(root, f.name, "file")
    return index
