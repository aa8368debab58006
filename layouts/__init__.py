"""The on-disk layout: the contract between the converter and the runtime (see FORMAT.md)."""

from .families import COMPONENTS, FAMILIES, family_for, text_config
from .index import (
    DENSE_FILE,
    EXPERTS_DIR,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    Component,
    FileEntry,
    Index,
    LayerFile,
    LayoutError,
    read_index,
    safe_relative_path,
    write_index,
)
from .plan import DEFAULT_ALIGNMENT, MAX_SPLIT, record_size, split_plan

__all__ = [
    "COMPONENTS",
    "DEFAULT_ALIGNMENT",
    "DENSE_FILE",
    "EXPERTS_DIR",
    "FAMILIES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MAX_SPLIT",
    "Component",
    "FileEntry",
    "Index",
    "LayerFile",
    "LayoutError",
    "family_for",
    "read_index",
    "record_size",
    "safe_relative_path",
    "split_plan",
    "text_config",
    "write_index",
]
