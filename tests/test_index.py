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


@pytest.fixture(scope="module")
def good_index(layout):
    _, out = layout("qwen3_5_moe")
    read_index(out)  # the unmodified index is valid
    return out, json.loads((out / INDEX_FILE).read_text())


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_malformed_index_is_a_layout_error_naming_the_file(good_index, tmp_path, what):
    out, raw = good_index
    damaged = copy.deepcopy(raw)
    DAMAGE[what](damaged)
    root = tmp_path / "layout"
    shutil.copytree(out, root)
    (root / INDEX_FILE).write_text(json.dumps(damaged))
    with pytest.raises(LayoutError) as e:
        read_index(root)
    message = str(e.value)
    assert str(root / INDEX_FILE) in message and "\n" not in message


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
