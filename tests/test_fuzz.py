"""Bounded fuzzing (fixed seed, a few seconds): mutated index JSON and config.json give a clean
one-line error naming the file, or a success that verifies; never a traceback of another type."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from flashmoe.convert import ConvertError, convert_checkpoint
from flashmoe.layouts import INDEX_FILE, LayoutError, read_index
from flashmoe.runtime import load
from mlx_lm import generate

from flashmoe.verify import verify_layout

SEED = 15
BUDGET_S = 20  # per test; the case counts below normally finish well within it
VALUES = [None, True, False, 0, -1, 1, 1.0, 1.5, 2**70, -(2**70), float("nan"), float("inf"),
          "", "x", "1", "\u00e9", [], {}, [1], [[0, 1]], {"a": 1}, "0" * 64]  # fmt: skip


def _paths(node, prefix=()):
    """Every (path) to a value inside a JSON tree."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):  # the first few items of long lists (checksums)
            yield from _paths(v, (*prefix, i))


def _parent(tree, path):
    for key in path[:-1]:
        tree = tree[key]
    return tree


def mutate(tree, rng: random.Random) -> tuple[str, tuple, bool]:
    """Change ``tree`` in place in one random way: ``(description, path, kept_json_type)``."""
    path = rng.choice([p for p in _paths(tree) if p])
    parent, key = _parent(tree, path), path[-1]
    old = parent[key]
    kind = rng.choice(["value", "value", "value", "delete", "unknown", "number"])
    if kind == "delete" and isinstance(parent, dict):
        del parent[key]
        kept = False
    elif kind == "unknown" and isinstance(parent, dict):
        parent["zz_unknown"] = rng.choice(VALUES)
        kept = False
    elif kind == "number" and isinstance(old, int) and not isinstance(old, bool):
        parent[key] = old + rng.choice([-1, 1, 4096, -(10**9)])
        kept = True
    else:
        kind, parent[key] = "value", rng.choice(VALUES)
        kept = _json_type(parent[key]) == _json_type(old)
    return f"{kind} at {'/'.join(map(str, path))}", path, kept


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    return type(v).__name__  # int, float, str, list, dict


# Free-form parts of the index: any JSON there is a legitimate success (config is checked
# against config.json when loading; test_layout_strict covers that).
FREE = ("config", "source", "created_by")


def one_line(e: BaseException, path: Path) -> None:
    msg = str(e)
    assert "\n" not in msg and msg.startswith(str(path)), msg


def test_fuzz_index(layout, tmp_path):
    _, out = layout("qwen3_moe")
    root = tmp_path / "layout"
    shutil.copytree(out, root)
    original = (root / INDEX_FILE).read_text()
    rng = random.Random(SEED)
    outcomes = {"refused": 0, "verified": 0, "verify refused": 0}
    deadline = time.monotonic() + BUDGET_S
    for case in range(400):
        if time.monotonic() > deadline:
            break
        tree = json.loads(original)
        changes = [mutate(tree, rng) for _ in range(rng.choice([1, 1, 2]))]
        what = " + ".join(c[0] for c in changes)
        text = json.dumps(tree)
        if case % 25 == 0:  # not UTF-8, or not JSON at all
            text = text[: rng.randrange(len(text))] + rng.choice(["\udcff", "{", "]"])
        (root / INDEX_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
        try:
            read_index(root)
        except LayoutError as e:
            one_line(e, root / INDEX_FILE)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # pragma: no cover - the failure being looked for
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
        for _, path, kept in changes:  # a wrong type or key outside the free parts: wrong success
            assert kept or path[0] in FREE or case % 25 == 0, f"case {case} ({what}) accepted"
        try:  # accepted: it must describe the files as they are, or verification says why not
            verify_layout(root)
            outcomes["verified"] += 1
        except LayoutError as e:
            assert "\n" not in str(e)
            outcomes["verify refused"] += 1
    print(f"index fuzz: {case + 1} cases, {outcomes}")
    assert outcomes["refused"] > 100, outcomes


def test_fuzz_source_config(checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3_moe"), src)
    original = (src / "config.json").read_text()
    rng = random.Random(SEED)
    outcomes = {"refused": 0, "converted": 0}
    deadline = time.monotonic() + BUDGET_S
    for case in range(60):
        if time.monotonic() > deadline:
            break
        tree = json.loads(original)
        what = mutate(tree, rng)
        (src / "config.json").write_text(json.dumps(tree))
        out = tmp_path / f"out{case}"
        try:
            convert_checkpoint(src, out, progress=False)
        except ConvertError as e:
            one_line(e, src)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
        verify_layout(out)  # a conversion that succeeded wrote a layout that loads and runs
        try:
            model, tokenizer = load(str(out), bank_experts=4)
            generate(model, tokenizer, "hi", max_tokens=2)
        except Exception as e:  # pragma: no cover
            pytest.fail(f"case {case} ({what}) converted, then {type(e).__name__}: {e}")
        outcomes["converted"] += 1
        shutil.rmtree(out)
    print(f"config fuzz: {case + 1} cases, {outcomes}")
    assert outcomes["refused"] > 5 and outcomes["converted"] > 5, outcomes


def test_checkpoint_mlx_lm_cannot_load_is_refused(checkpoint, tmp_path):
    import mlx.core as mx

    src = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3_moe"), src)
    mx.save_safetensors(str(src / "model-extra.safetensors"), {"extra.weight": mx.zeros((4,))})
    wm = json.loads((src / "model.safetensors.index.json").read_text())
    wm["weight_map"]["extra.weight"] = "model-extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(wm))
    with pytest.raises(ConvertError, match="mlx-lm cannot load this checkpoint .*extra.weight"):
        convert_checkpoint(src, tmp_path / "a", progress=False)
    (src / "model-extra.safetensors").unlink()
    del wm["weight_map"]["extra.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(wm))
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] += 1  # a MoE layer the shards do not have
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConvertError) as info:
        convert_checkpoint(src, tmp_path / "b", progress=False)
    assert "\n" not in str(info.value) and "model.layers.4." in str(info.value), info.value


def _rewrite_header(path: Path, header: dict, raw: bytes) -> None:
    import struct

    (n,) = struct.unpack("<Q", raw[:8])
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def test_fuzz_shard_headers(checkpoint, tmp_path):
    import struct

    src = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3_moe"), src)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    original = json.loads(raw[8 : 8 + n])
    rng = random.Random(SEED)
    outcomes = {"refused": 0, "converted": 0}
    deadline = time.monotonic() + BUDGET_S
    for case in range(80):
        if time.monotonic() > deadline:
            break
        header = json.loads(json.dumps(original))
        what = mutate(header, rng)[0]
        _rewrite_header(shard, header, raw)
        out = tmp_path / f"out{case}"
        try:
            convert_checkpoint(src, out, progress=False)
        except ConvertError as e:
            msg = str(e)
            assert "\n" not in msg and msg.startswith(str(src)), (case, what, msg)
            outcomes["refused"] += 1
            continue
        except Exception as e:  # pragma: no cover
            pytest.fail(f"case {case} ({what}): {type(e).__name__}: {e}")
        verify_layout(out)
        model, tokenizer = load(str(out), bank_experts=4)
        generate(model, tokenizer, "hi", max_tokens=2)
        outcomes["converted"] += 1
        shutil.rmtree(out)
    shard.write_bytes(raw)
    print(f"shard header fuzz: {case + 1} cases, {outcomes}")
    assert outcomes["refused"] > 20, outcomes
