"""The layout index: every malformed field is a one-line LayoutError naming the index file."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from flashmoe.layouts import INDEX_FILE, LayoutError, read_index
from flashmoe.layouts.plan import split_plan


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


def _drop_plan(d):
    del d["split_plans"]["8"]


# Keyed by the FORMAT.md rule each case breaks.
DAMAGE = {
    "[R4] alignment is a string": _set(["alignment"], "x"),
    "[R4] num_experts is a string": _set(["num_experts"], "16"),
    "[R4] config is a string": _set(["config"], "x"),
    "[R13] split plan key x": _set(["split_plans", "x"], [[0, 1]]),
    "[R13] split plan key 9": _set(["split_plans", "9"], [[0, 1]]),
    "[R13] no split plans": _set(["split_plans"], {}),
    "[R13] a split plan missing": _drop_plan,
    "[R13] a split plan off the rule": _set(["split_plans", "2"], [[0, 100], [100, 27648]]),
    "[R6] wrong component shape": _set(["components", 0, "shape"], [1, 2]),
    "[R7] unknown dtype": _set(["components", 1, "dtype"], "I64"),
    "[R16] dense file renamed": _set(["dense", "name"], "."),
    "[R12] dense file elsewhere": _set(["dense", "name"], "other.safetensors"),
    "[R16] layer file escapes": _set(["layers", 0, "file"], "../layer.bin"),
    "[R16] layer file absolute": _set(["layers", 0, "file"], "/etc/passwd"),
    "[R16] layer file is the directory": _set(["layers", 0, "file"], "."),
    "[R10] duplicate layers": _set(["layers", 1, "layer"], 0),
    "[R4] checksum not hex": _set(["layers", 0, "checksums", 0], "z" * 64),
    "[R10] too few checksums": _set(["layers", 0, "checksums"], []),
    "[R5] record size wrong": _set(["record_size"], 4096),
    "[R14] top_k too large (config disagrees)": _set(["top_k"], 999),
    "[R3] layers not a list of objects": _set(["layers"], [1, 2]),
    "[R6] components missing": _set(["components"], []),
    "[R16] copied file name with NUL": _set(["files", 0, "name"], "a\0b"),
}


DELETE = object()
# More rules, with what the line must say; an edit may return the bytes to write, or DELETE.
RULES = {
    "[R1] another format": (_set(["format"], "other"), "not a flashmoe-layout index"),
    "[R1] not JSON": (lambda d: b"{", "unreadable index"),
    "[R1] no index": (lambda d: DELETE, "missing (not a flashmoe layout"),
    "[R2] version 3": (_set(["version"], 3), "format version 3 is not supported"),
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
    "[R7] a U8 weight": (_u8_weight, "gate_proj.weight: dtype U8 or shape"),
    "[R7] an I64 component": (_set(["components", 1, "dtype"], "I64"), "dtype 'I64' is not one of"),
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


CASES = {**{what: (edit, "") for what, edit in DAMAGE.items()}, **RULES}


@pytest.fixture(scope="module")
def good_index(layout):
    _, out = layout("qwen3_5_moe")
    read_index(out)  # the unmodified index is valid
    return out, json.loads((out / INDEX_FILE).read_text())


@pytest.mark.parametrize("what", sorted(CASES))
def test_malformed_index_is_a_layout_error_naming_the_file(good_index, tmp_path, what):
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


def test_split_plans_follow_the_format_rule():
    # FORMAT.md's example: the 397B expert (432 pages of 16 KiB) split 4 ways is 4 x 108 pages.
    assert split_plan(7_077_888, 16384, 4) == [
        (i * 1_769_472, (i + 1) * 1_769_472) for i in range(4)
    ]
    # Fewer pages than chunks: one chunk per page, the last one ending at expert_bytes.
    assert split_plan(27648, 16384, 8) == [(0, 16384), (16384, 27648)]
    plan = split_plan(221184, 4096, 5)
    assert plan[0][0] == 0 and plan[-1][1] == 221184
    assert all(a % 4096 == 0 for a, _ in plan)
    assert all(b == c for (_, b), (c, _) in zip(plan, plan[1:], strict=False))
