"""The on-disk layout: the contract between the converter and the runtime (see FORMAT.md).

Imports nothing else of flashmoe.
"""

from .errors import LayoutError
from .families import COMPONENTS, FAMILIES, family_named, text_config
from .hfcache import CacheSnapshot, blob_sha256, cache_snapshot
from .index import (
    FORMAT_NAME,
    FORMAT_VERSION,
    READ_VERSIONS,
    Component,
    FileEntry,
    Index,
    LayerFile,
    read_index,
)
from .naming import (
    CARD_FILE,
    CODE_PATTERNS,
    COPIED_FILES,
    DENSE_FILE,
    EXPERTS_DIR,
    INDEX_FILE,
    TOKENIZER_FILES,
    copied_files,
    layer_file,
    listed_files,
    lists_tokenizer,
    safe_relative_path,
)
from .plan import DEFAULT_ALIGNMENT, MAX_SPLIT, record_size, split_plan

__all__ = [
    "CARD_FILE",
    "CODE_PATTERNS",
    "COMPONENTS",
    "COPIED_FILES",
    "DEFAULT_ALIGNMENT",
    "DENSE_FILE",
    "EXPERTS_DIR",
    "FAMILIES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "MAX_SPLIT",
    "READ_VERSIONS",
    "TOKENIZER_FILES",
    "CacheSnapshot",
    "Component",
    "FileEntry",
    "Index",
    "LayerFile",
    "LayoutError",
    "blob_sha256",
    "cache_snapshot",
    "copied_files",
    "family_named",
    "layer_file",
    "listed_files",
    "lists_tokenizer",
    "read_index",
    "record_size",
    "safe_relative_path",
    "split_plan",
    "text_config",
]
