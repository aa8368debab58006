"""layouts/FORMAT.md's refusal rules: every tagged rule has a test (the tag, in brackets, appears in a
test file), and the rules no other test covered are exercised here, each refused in one line."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import flashmoe.layouts
import pytest
from flashmoe.layouts import INDEX_FILE, LayoutError, read_index

FORMAT = Path(flashmoe.layouts.__file__).parent / "FORMAT.md"
TESTS = Path(__file__).parent
DELETE = object()


def test_every_rule_of_the_spec_has_a_test():
    spec = set(re.findall(r"\*\*\[(R\d+)\]\*\*", FORMAT.read_text()))
    tested = set()
    for path in TESTS.glob("test_*.py"):
        tested |= set(re.findall(r"\[(R\d+)\]", path.read_text()))
    assert len(spec) >= 20
    assert not spec - tested, f"FORMAT.md rules without a test: {sorted(spec - tested)}"
    assert not tested - spec, f"tests name rules FORMAT.md lacks: {sorted(tested - spec)}"


def _set(path, value):
    def apply(d):
        *head, last = path
        for key in head:
            d = d[key]
        d[last] = value

    return apply


def _text_config(d: dict) -> dict:
    return d["config"].get("text_config", d["config"])


def _u8_weight(d):
    c = d["components"][0]  # same bytes, as 4x as many U8 elements
    c["dtype"], c["shape"] = "U8", [c["shape"][0], c["shape"][1] * 4]


def _swap_components(d):
    d["components"][0], d["components"][1] = d["components"][1], d["components"][0]


def _top_k_zero(d):
    _text_config(d).pop("num_experts_per_tok", None)
    d["top_k"] = 0


def _grow(path, by):
    def apply(d):
        *head, last = path
        for key in head:
            d = d[key]
        d[last] += by

    return apply


# Index rules without a case in test_index.py / test_layout_strict.py: (edit, what the line says).
CASES = {
    "[R1] another format": (_set(["format"], "other"), "not a flashmoe-layout index"),
    "[R1] not JSON": (lambda d: b"{", "unreadable index"),
    "[R1] no index": (lambda d: DELETE, "missing (not a flashmoe layout"),
    "[R2] version 2": (_set(["version"], 2), "format version 2 is not supported"),
    "[R3] unknown component key": (_set(["components", 0, "zz"], 1), "components[0]: unknown key"),
    "[R3] missing file key": (lambda d: d["files"][0].pop("sha256"), "files[0]: missing key"),
    "[R4] negative file size": (_set(["files", 0, "size"], -1), "file entry 'config.json'"),
    "[R4] created_by a number": (_set(["created_by"], 1), "created_by must be a string"),
    "[R4] source a list": (_set(["source"], []), "source must be an object"),
    "[R4] checksum in upper case": (
        lambda d: d["layers"][0]["checksums"].__setitem__(0, "A" * 64),
        "layer entry 0 is malformed",
    ),
    "[R5] alignment not a power of two": (_set(["alignment"], 12288), "power of two >= 4096"),
    "[R5] alignment below 4096": (_set(["alignment"], 2048), "power of two >= 4096"),
    "[R6] components out of order": (_swap_components, "in that order"),
    "[R6] a gap between components": (_grow(["components", 1, "offset"], 2), "has offset"),
    "[R6] components short of expert_bytes": (_grow(["expert_bytes"], 1), "components add up"),
    "[R7] a U8 component": (_u8_weight, "dtype 'U8' is not one of"),
    "[R8] mode mxfp4": (_set(["components", 0, "mode"], "mxfp4"), "mode='mxfp4'"),
    "[R8] 7 bits": (_set(["components", 3, "bits"], 7), "bits=7"),
    "[R8] group size 0": (_set(["components", 7, "group_size"], 0), "group_size=0"),
    "[R9] top_k 0": (_top_k_zero, "top_k 0 is not in 1..num_experts"),
    "[R10] no layers": (_set(["layers"], []), "no MoE layers"),
    "[R10] negative layer": (_set(["layers", 0, "layer"], -1), "distinct and increasing"),
    "[R10] layers decreasing": (lambda d: d["layers"].reverse(), "distinct and increasing"),
    "[R10] layer size": (_grow(["layers", 0, "size"], 16384), "!= num_experts * record_size"),
    "[R11] md5": (_set(["checksum"], "md5"), "checksum must be 'sha256'"),
}


@pytest.fixture(scope="module")
def good_index(layout):
    _, out = layout("qwen3_5_moe")
    return out, json.loads((out / INDEX_FILE).read_text())


@pytest.mark.parametrize("what", sorted(CASES))
def test_index_rule_is_refused_in_one_line(good_index, tmp_path, what):
    out, raw = good_index
    edit, needle = CASES[what]
    damaged = copy.deepcopy(raw)
    content = edit(damaged)
    root = tmp_path / "layout"
    shutil.copytree(out, root)
    if content is DELETE:
        (root / INDEX_FILE).unlink()
    else:
        data = content if isinstance(content, bytes) else json.dumps(damaged).encode()
        (root / INDEX_FILE).write_bytes(data)
    with pytest.raises(LayoutError) as e:
        read_index(root)
    message = str(e.value)
    assert message.startswith(str(root / INDEX_FILE)) and "\n" not in message, message
    assert needle in message, message


def test_config_and_source_take_any_keys(good_index, tmp_path):
    """[R3]: only config and source are open objects (config.json must follow: [R15])."""
    out, raw = good_index
    root = tmp_path / "layout"
    shutil.copytree(out, root)
    edited = copy.deepcopy(raw)
    edited["config"]["zz_anything"] = {"nested": [1, None]}
    edited["source"]["zz_anything"] = 1
    (root / INDEX_FILE).write_text(json.dumps(edited))
    assert read_index(root).config["zz_anything"] == {"nested": [1, None]}


# --- [R20]: the model mlx-lm builds must be the layout's ---


@pytest.fixture
def copied(layout, tmp_path) -> Path:
    _, out = layout("qwen3_moe")
    dst = tmp_path / "layout"
    shutil.copytree(out, dst)
    return dst


def _edit_index(root: Path, edit) -> None:
    d = json.loads((root / INDEX_FILE).read_text())
    edit(d)
    (root / INDEX_FILE).write_text(json.dumps(d))


def test_a_moe_layer_missing_from_the_index_is_refused(copied):
    """[R20]"""
    from flashmoe.runtime import load

    _edit_index(copied, lambda d: d["layers"].pop())
    with pytest.raises(LayoutError, match=r"the model has MoE layers \[.*\] but the layout has"):
        load(str(copied), bank_experts=4)


def test_a_dense_file_with_an_extra_tensor_is_refused(copied):
    """[R20]: mlx-lm loads the dense file strictly."""
    import mlx.core as mx
    from flashmoe.runtime import load

    dense = copied / "model-dense.safetensors"
    weights = dict(mx.load(str(dense)))
    weights["model.extra.weight"] = mx.zeros((4,))
    dense.unlink()
    mx.save_safetensors(str(dense), weights, metadata={"format": "mlx"})
    data = dense.read_bytes()
    _edit_index(
        copied,
        lambda d: d["dense"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest()),
    )
    with pytest.raises(LayoutError, match="mlx-lm failed to build the model") as e:
        load(str(copied), bank_experts=4)
    assert "model.extra.weight" in str(e.value) and "\n" not in str(e.value)
