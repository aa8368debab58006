"""Strict index types, config agreement, load() argument types, listed files only, --verify of
the dense file: each a one-line error naming the file, never a traceback or a wrong success."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from flashmoe.layouts import INDEX_FILE, LayoutError, read_index
from flashmoe.runtime import load


@pytest.fixture
def copy(layout, tmp_path):
    _, out = layout("qwen3_moe")
    dst = tmp_path / "layout"
    shutil.copytree(out, dst)
    return dst


def edit_json(path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


# [R2] version, [R4] types, [R3] keys, [R14] config agreement
@pytest.mark.parametrize(
    "edit, needle",
    [
        (_set("version", 1.0), "format version 1.0 is not supported"),
        (_set("version", True), "format version True is not supported"),
        (
            lambda d: d["split_plans"].__setitem__("1", [[0.0, float(d["expert_bytes"])]]),
            "split plan '1' must be a list of [start, end] integer pairs",
        ),
        (_set("surprise", 1), "malformed index (index: unknown key 'surprise')"),
        (lambda d: d["layers"][0].__setitem__("extra", 1), "layers[0]: unknown key 'extra'"),
        (lambda d: d["dense"].pop("size"), "dense: missing key 'size'"),
        (lambda d: d["config"].__setitem__("num_experts_per_tok", 3), "num_experts_per_tok 3"),
        (lambda d: d["config"].__setitem__("num_experts", 32), "config num_experts 32 disagrees"),
        (lambda d: d["config"].__setitem__("model_type", ["qwen3_moe"]), "config model_type"),
        (
            lambda d: d["config"].__setitem__("text_config", [1]),
            "text_config must be a JSON object",
        ),
        (_set("model_type", ["qwen3_moe"]), "model_type a string"),
        (lambda d: d["files"][0].__setitem__("sha256", "x"), "sha256 must be 64 lowercase hex"),
        (
            lambda d: d["components"][1].__setitem__("shape", [0, 2]),
            "component 'gate_proj.scales': shape [0, 2] must be a list of positive integers",
        ),
        (lambda d: d["components"][1].__setitem__("dtype", ["BF16"]), "dtype ['BF16'] is not one"),
    ],
)
def test_index_values_of_the_wrong_type_or_meaning_are_refused(copy, edit, needle):
    edit_json(copy / INDEX_FILE, edit)
    with pytest.raises(LayoutError) as info:
        read_index(copy)
    msg = str(info.value)
    assert msg.startswith(str(copy / INDEX_FILE)) and needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_set("num_experts_per_tok", 12), "key 'num_experts_per_tok'"),
        (_set("model_type", ["qwen3_moe"]), "key 'model_type'"),
        (lambda c: c.pop("num_experts"), "key 'num_experts'"),
    ],
)
def test_config_json_that_disagrees_with_the_index_is_refused(copy, edit, needle):
    """[R15]"""
    edit_json(copy / "config.json", edit)
    with pytest.raises(LayoutError, match="config.json: differs from the config in") as info:
        load(str(copy), bank_experts=4)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(bank_experts=3.5), "bank_experts must be an integer, got 3.5"),
        (dict(k=2.0), "k must be an integer, got 2.0"),
        (dict(bank_experts=True), "bank_experts must be an integer"),
        (dict(memory_budget_gb="1"), "memory budget must be a finite number of GB >= 0, got '1'"),
        (dict(memory_budget_gb=float("inf")), "got inf"),
        (dict(memory_budget_gb=-1), "got -1"),
        (dict(cache_io_split=2.0), "cache_io_split must be an integer"),
        (dict(io_threads=0), "io_threads must be at least 1"),
    ],
)
def test_load_arguments_of_the_wrong_type(copy, kwargs, needle):
    with pytest.raises(ValueError) as info:
        load(str(copy), **kwargs)
    assert needle in str(info.value)


def test_unlisted_files_are_not_used(copy):
    (copy / "chat_template.jinja").write_text("{{ 'EVIL' }}")  # not in the index
    dense = copy / "model-dense.safetensors"
    shutil.copy(dense, copy / "model-evil.safetensors")  # would be loaded by mlx-lm's glob
    _, tokenizer = load(str(copy), bank_experts=4)
    assert "EVIL" not in str(tokenizer.chat_template)


def test_missing_tokenizer_is_one_line(copy):
    """[R19]"""
    edit_json(
        copy / INDEX_FILE,
        lambda d: d.__setitem__("files", [f for f in d["files"] if f["name"] != "tokenizer.json"]),
    )
    with pytest.raises(LayoutError, match="lists no tokenizer"):
        load(str(copy), bank_experts=4)


def test_verify_checks_the_dense_file(copy):
    """[R23] with load(verify=True)."""
    dense = copy / "model-dense.safetensors"
    data = bytearray(dense.read_bytes())
    data[-3] ^= 1  # a weight byte: loads fine, computes wrong
    dense.write_bytes(bytes(data))
    load(str(copy), bank_experts=4)  # unverified: loads
    with pytest.raises(LayoutError, match="model-dense.safetensors: sha256 mismatch"):
        load(str(copy), bank_experts=4, verify=True)


def test_a_moe_layer_missing_from_the_index_is_refused(copy):
    """[R20]"""
    edit_json(copy / INDEX_FILE, lambda d: d["layers"].pop())
    with pytest.raises(LayoutError, match=r"the model has MoE layers \[.*\] but the layout has"):
        load(str(copy), bank_experts=4)


def test_a_dense_file_with_an_extra_tensor_is_refused(copy):
    """[R20]: mlx-lm loads the dense file strictly."""
    import mlx.core as mx

    dense = copy / "model-dense.safetensors"
    weights = dict(mx.load(str(dense)))
    weights["model.extra.weight"] = mx.zeros((4,))
    dense.unlink()
    mx.save_safetensors(str(dense), weights, metadata={"format": "mlx"})
    data = dense.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    edit_json(copy / INDEX_FILE, lambda d: d["dense"].update(size=len(data), sha256=sha))
    with pytest.raises(LayoutError, match="mlx-lm failed to build the model") as e:
        load(str(copy), bank_experts=4)
    assert "model.extra.weight" in str(e.value) and "\n" not in str(e.value)
