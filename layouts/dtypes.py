"""The dtype table: safetensors dtype names (the contract's spelling) -> size, numpy and MLX types.

Source shards and the layout's index spell dtypes as safetensors does (``"BF16"``, ``"U32"``...).
Only the names and sizes are contract; the numpy and MLX types are looked up on demand, so reading
an index does not import MLX.
"""

from __future__ import annotations

from typing import NamedTuple


class DType(NamedTuple):
    size: int  # bytes per element
    numpy: str | None  # numpy's name; None where numpy has no such type (bfloat16, float8)
    mlx: str | None  # mlx.core's name; None where MLX has no such type


DTYPES: dict[str, DType] = {
    "BOOL": DType(1, "bool", "bool_"),
    "U8": DType(1, "uint8", "uint8"),
    "I8": DType(1, "int8", "int8"),
    "F8_E4M3": DType(1, None, None),
    "F8_E5M2": DType(1, None, None),
    "U16": DType(2, "uint16", "uint16"),
    "I16": DType(2, "int16", "int16"),
    "F16": DType(2, "float16", "float16"),
    "BF16": DType(2, None, "bfloat16"),
    "U32": DType(4, "uint32", "uint32"),
    "I32": DType(4, "int32", "int32"),
    "F32": DType(4, "float32", "float32"),
    "U64": DType(8, "uint64", "uint64"),
    "I64": DType(8, "int64", "int64"),
    "F64": DType(8, "float64", "float64"),
}

SIZES: dict[str, int] = {name: d.size for name, d in DTYPES.items()}

# The dtypes an expert component may have in a layout's index (FORMAT.md [R7]): packed weights
# are U32, scales and biases keep the source's float dtype; the fp modes' scales are U8 (version 2).
COMPONENT_DTYPES: tuple[str, ...] = ("U32", "U8", "BF16", "F16", "F32")


def numpy_dtype(name: str):
    """The numpy dtype of safetensors dtype ``name``; ValueError where numpy has none."""
    import numpy as np

    d = DTYPES[name]
    if d.numpy is None:
        raise ValueError(f"numpy has no dtype for {name}")
    return np.dtype(d.numpy)


def mlx_dtype(name: str):
    """The ``mlx.core`` dtype of safetensors dtype ``name``; ValueError where MLX has none."""
    import mlx.core as mx

    d = DTYPES[name]
    if d.mlx is None:
        raise ValueError(f"MLX has no dtype for {name}")
    return getattr(mx, d.mlx)
