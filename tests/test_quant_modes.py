"""Every quantization mode of mlx-lm's QuantizedSwitchLinear converts and streams bit-identically."""

from __future__ import annotations

import mlx.core as mx
import pytest
from flashmoe.layouts import COMPONENTS, read_index
from identity import assert_identical

TINY = {"hidden": 64, "moe_intermediate": 64, "num_experts": 16, "top_k": 2, "num_layers": 2}

# (mode, bits, group_size): every affine width mlx packs, and the three fp modes at their only
# (bits, group) pair (None: mlx-lm's defaults for the mode).
MODES = [
    ("affine", 2, 32),
    ("affine", 3, 64),
    ("affine", 4, 64),
    ("affine", 5, 64),
    ("affine", 6, 64),
    ("affine", 8, 32),
    ("mxfp4", None, None),
    ("mxfp8", None, None),
    ("nvfp4", None, None),
]


@pytest.mark.parametrize(("mode", "bits", "group_size"), MODES)
def test_mode_bit_identical(layout, mode, bits, group_size):
    src, out = layout("qwen3_moe", mode=mode, bits=bits, group_size=group_size, **TINY)
    index = read_index(out)
    expected = [(mode, bits or index.components[0].bits)]
    assert sorted({(c.mode, c.bits) for c in index.components}) == expected
    names = [c.name for c in index.components]
    if mode == "affine":
        assert index.version == 1 and names == list(COMPONENTS)
    else:  # no biases: version 2, weight and scales per projection
        assert index.version == 2 and all(not n.endswith(".biases") for n in names)
        assert {c.dtype for c in index.components if c.name.endswith(".scales")} == {"U8"}
    assert_identical(src, out)


@pytest.mark.parametrize("family", ["qwen3_5_moe", "qwen3_next"])
def test_fp_mode_on_hybrid_families(layout, family):
    src, out = layout(family, mode="mxfp4", bits=None, group_size=None, **dict(TINY, num_layers=4))
    assert read_index(out).version == 2
    assert_identical(src, out, fractions=(0.0, 1.0))


def test_nvfp4_global_scale(layout):
    """nvfp4 with one tensor scale per expert (``mlx_lm.convert --q-global-scale``): the scale is a
    record component of its own. gather_qmm applies it only on the GPU, in stock mlx-lm too."""
    src, out = layout(
        "qwen3_moe", mode="nvfp4", bits=None, group_size=None, global_scale=True, **TINY
    )
    index = read_index(out)
    scales = [c for c in index.components if c.name.endswith(".global_scale")]
    assert [c.name for c in scales] == [
        f"{p}.global_scale" for p in ("gate_proj", "up_proj", "down_proj")
    ]
    assert all(c.dtype == "F32" and c.shape == [] and c.nbytes == 4 for c in scales)
    if mx.default_device() == mx.cpu:
        pytest.skip("gather_qmm applies an nvfp4 global scale only on the GPU")
    assert_identical(src, out)


def _swap_first_two(d):
    d["components"][0], d["components"][1] = d["components"][1], d["components"][0]


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        # [R2] a version this flashmoe does not know
        (lambda d: d.update(version=3), "format version 3 is not supported (this flashmoe reads"),
        # [R6] version 1 holds only the nine affine components
        (lambda d: d.update(version=1), "components must be"),
        # [R24] parts in record order, with the dtype of their part and mode
        (_swap_first_two, "gate_proj parts ['scales', 'weight'] are not those of mode 'mxfp4'"),
        (lambda d: d["components"][1].update(dtype="BF16"), "dtype BF16 or shape"),
        # [R25] each fp mode has one (bits, group size)
        (lambda d: d["components"][0].update(group_size=64), "group_size=64 is not supported"),
    ],
)
def test_version_2_index_is_checked(layout, tmp_path, edit, needle):
    import json
    import shutil

    from flashmoe.layouts import INDEX_FILE, LayoutError

    _, out = layout("qwen3_moe", mode="mxfp4", bits=None, group_size=None, **TINY)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    raw = json.loads((copy / INDEX_FILE).read_text())
    edit(raw)
    (copy / INDEX_FILE).write_text(json.dumps(raw))
    with pytest.raises(LayoutError) as info:
        read_index(copy)
    assert needle in str(info.value) and "\n" not in str(info.value), info.value
