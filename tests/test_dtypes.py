"""layouts.dtypes, the one dtype table: its names are safetensors' own, its sizes numpy's and MLX's."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from flashmoe.layouts.dtypes import COMPONENT_DTYPES, DTYPES, mlx_dtype, numpy_dtype
from safetensors.numpy import save


@pytest.mark.parametrize("name", [n for n, d in DTYPES.items() if d.numpy])
def test_names_are_what_safetensors_writes(name):
    data = save({"t": np.zeros(3, dtype=numpy_dtype(name))})
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["t"]["dtype"] == name
    assert numpy_dtype(name).itemsize == DTYPES[name].size


@pytest.mark.parametrize("name", [n for n, d in DTYPES.items() if d.mlx])
def test_mlx_types_have_the_size(name):
    assert mlx_dtype(name).size == DTYPES[name].size


def test_every_component_dtype_has_a_bank_type():
    assert {mlx_dtype(n) for n in COMPONENT_DTYPES} >= {mx.uint32, mx.bfloat16}
    with pytest.raises(ValueError, match="numpy has no dtype for BF16"):
        numpy_dtype("BF16")
