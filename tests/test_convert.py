"""flashmoe-convert: byte-exact repacking, the dense file, determinism, the index and model card."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from flashmoe.convert import convert_checkpoint
from flashmoe.layouts import COMPONENTS, DENSE_FILE, INDEX_FILE, read_index, split_plan
from safetensors import safe_open

from flashmoe.verify import verify_layout

FAMILIES = ["qwen3_5_moe", "qwen3_5_moe_flat", "qwen3_moe", "qwen3_next"]
# (bits, group_size, dtype): every bits, group size and dtype at least once.
QUANT = [(4, 32, "float16"), (8, 64, "bfloat16"), (8, 128, "float16"), (4, 128, "bfloat16")]


def raw_bytes(a: mx.array) -> bytes:
    """The bytes of an array as stored (bf16 too), without any conversion."""
    return bytes(np.asarray(a.view(mx.uint8)))


def source_tensors(src: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Every tensor of a checkpoint, loaded by mx.load, and its shard name."""
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    arrays: dict[str, mx.array] = {}
    for shard in sorted(set(weight_map.values())):
        arrays.update(mx.load(str(src / shard)))
    assert set(arrays) == set(weight_map)
    return arrays, weight_map


def assert_records_match_source(src: Path, out: Path) -> None:
    index = read_index(out)
    arrays, weight_map = source_tensors(src)
    n_moe = 0
    for entry in index.layers:
        data = (out / entry.file).read_bytes()
        assert len(data) == entry.size == index.num_experts * index.record_size
        stacked = [arrays[f"{entry.source_prefix}.switch_mlp.{c}"] for c in COMPONENTS]
        for comp, a in zip(index.components, stacked, strict=True):
            assert a.shape[0] == index.num_experts and list(a.shape[1:]) == comp.shape
        for e in range(index.num_experts):
            rec = data[e * index.record_size : (e + 1) * index.record_size]
            expected = b"".join(raw_bytes(a[e]) for a in stacked)
            assert rec[: index.expert_bytes] == expected, f"layer {entry.layer} expert {e}"
            assert rec[index.expert_bytes :] == bytes(index.record_size - index.expert_bytes)
            assert hashlib.sha256(expected).hexdigest() == entry.checksums[e]
        n_moe += 1
    assert n_moe == index.config.get("text_config", index.config)["num_hidden_layers"]
    # The same slices through the safetensors library, for the weights (numpy has no bf16).
    entry = index.layers[-1]
    key = f"{entry.source_prefix}.switch_mlp.down_proj.weight"
    with safe_open(str(src / weight_map[key]), framework="numpy") as f:
        w = f.get_tensor(key)
    data = (out / entry.file).read_bytes()
    comp = index.component("down_proj.weight")
    for e in (0, index.num_experts - 1):
        start = e * index.record_size + comp.offset
        assert data[start : start + comp.nbytes] == w[e].tobytes()


def assert_dense_matches_source(src: Path, out: Path) -> None:
    arrays, _ = source_tensors(src)
    dense_names = sorted(k for k in arrays if ".switch_mlp." not in k)
    loaded = mx.load(str(out / DENSE_FILE))
    assert sorted(loaded) == dense_names
    for k in dense_names:
        assert loaded[k].dtype == arrays[k].dtype and loaded[k].shape == arrays[k].shape, k
        assert raw_bytes(loaded[k]) == raw_bytes(arrays[k]), k
    with safe_open(str(out / DENSE_FILE), framework="numpy") as f:
        assert sorted(f.keys()) == dense_names
        assert f.metadata() == {"format": "mlx"}
        for k in dense_names:  # numpy has no bf16: compare the packed weights this way
            if arrays[k].dtype == mx.uint32:
                assert f.get_tensor(k).tobytes() == raw_bytes(arrays[k]), k
    raw = (out / DENSE_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    assert names == sorted(names)
    assert [header[k]["data_offsets"][0] for k in names] == sorted(
        header[k]["data_offsets"][0] for k in names
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_families_byte_exact(layout, family):
    src, out = layout(family)
    assert_records_match_source(src, out)
    assert_dense_matches_source(src, out)
    verify_layout(out)


@pytest.mark.parametrize(("bits", "group_size", "dtype"), QUANT)
def test_quantizations_byte_exact(checkpoint, tmp_path, bits, group_size, dtype):
    family = "qwen3_moe" if bits == 4 else "qwen3_5_moe"
    src = checkpoint(family, bits=bits, group_size=group_size, dtype=dtype)
    out = tmp_path / "out"
    index = convert_checkpoint(src, out, progress=False, alignment=4096)
    assert index.alignment == 4096 and index.record_size % 4096 == 0
    assert {(c.bits, c.group_size, c.mode) for c in index.components} == {
        (bits, group_size, "affine")
    }
    scale_dtype = {"float16": "F16", "bfloat16": "BF16"}[dtype]
    assert [c.dtype for c in index.components] == ["U32", scale_dtype, scale_dtype] * 3
    assert_records_match_source(src, out)
    assert_dense_matches_source(src, out)


def test_index_contents(layout):
    src, out = layout("qwen3_5_moe")
    index = read_index(out)
    config = json.loads((src / "config.json").read_text())
    assert index.config == config and index.model_type == "qwen3_5_moe"
    assert (index.num_experts, index.top_k) == (16, 4)
    assert [e.layer for e in index.layers] == [0, 1, 2, 3]
    assert [e.file for e in index.layers] == [f"experts/layer-{i:03d}.bin" for i in range(4)]
    assert index.layers[0].source_prefix == "language_model.model.layers.0.mlp"
    assert index.created_by == "flashmoe 0.1.0"
    for n in range(1, 9):
        assert index.split_plans[str(n)] == [
            list(r) for r in split_plan(index.expert_bytes, index.alignment, n)
        ]
    names = {f.name for f in index.files}
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= names
    for f in index.files:
        assert (out / f.name).read_bytes() == (src / f.name).read_bytes()
        assert hashlib.sha256((src / f.name).read_bytes()).hexdigest() == f.sha256
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    source_names = [f["name"] for f in index.source["files"]]
    assert set(shards) <= set(source_names) and source_names == sorted(source_names)
    for f in index.source["files"]:
        assert f["size"] == (src / f["name"]).stat().st_size and f["sha256"] is None
    assert index.source["repo_id"] is None and index.source["path"] == str(src.resolve())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [INDEX_FILE, DENSE_FILE, "README.md", "experts", *names]
    )


def card_data(layout_dir: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard((layout_dir / "README.md").read_text()).data.to_dict()


def test_model_card(layout):
    _, out = layout("qwen3_moe")
    card = (out / "README.md").read_text()
    data = card_data(out)
    assert data["license"] == "apache-2.0" and data["library_name"] == "mlx"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"] == ["mlx", "moe", "flashmoe", "qwen3_moe"]
    assert "base_model" not in data  # a local source has no repo id
    assert (
        "pip install flashmoe" in card and "flashmoe-run" in card and "flashmoe-index.json" in card
    )


def test_deterministic(checkpoint, tmp_path):
    src = checkpoint("qwen3_moe")
    a = convert_checkpoint(src, tmp_path / "a", progress=False, workers=1)
    b = convert_checkpoint(src, tmp_path / "b", progress=False, workers=3)
    assert a == b
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")


def test_verify_option_and_rerun_of_finished_layout(checkpoint, tmp_path, capsys):
    src = checkpoint("qwen3_moe")
    out = tmp_path / "out"
    first = convert_checkpoint(src, out, progress=False, verify=True)
    before = tree_bytes(out)
    again = convert_checkpoint(src, out, progress=False)  # same command again: nothing to do
    assert again == first and tree_bytes(out) == before


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_cli_end_to_end(checkpoint, tmp_path):
    src = checkpoint("qwen3_5_moe_flat")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "flashmoe.convert.cli"]
    r = subprocess.run([*cmd, str(src), "-o", str(out), "--verify"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "convert" in r.stderr and "B/s" in r.stderr  # the tqdm bar, in bytes
    r = subprocess.run([*cmd, "verify", str(out), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    r = subprocess.run(
        [*cmd, str(src), "-o", str(tmp_path / "q"), "--quiet"], capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stderr == ""
    assert tree_bytes(out) == tree_bytes(tmp_path / "q")


# --- Hub sources, through a local Hub emulator and the real huggingface_hub client ---


def _hub_env(tmp_path: Path, url: str) -> dict:
    env = dict(
        os.environ, HF_ENDPOINT=url, HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_DISABLE_XET="1"
    )
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    return env


def test_hub_source(checkpoint, tmp_path):
    from hub_emulator import HubEmulator

    src = checkpoint("qwen3_moe")
    with HubEmulator(tmp_path / "hub") as hub:
        hub.create_repo("org/tiny-moe", "tester", False)
        for p in sorted(src.iterdir()):
            hub.put_file("org/tiny-moe", p.name, p.read_bytes())
        hub.put_file("org/tiny-moe", "modeling_evil.py", b"raise SystemExit('remote code ran')\n")
        card = b"---\nlicense: mit\nlanguage: en\n---\n# tiny\n"
        commit = hub.put_file("org/tiny-moe", "README.md", card)
        env = _hub_env(tmp_path, hub.url)
        cmd = [sys.executable, "-m", "flashmoe.convert.cli", "org/tiny-moe"]
        r = subprocess.run(
            [*cmd, "-o", str(tmp_path / "a"), "--quiet", "--keep-source"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
    index = read_index(tmp_path / "a")
    assert index.source["repo_id"] == "org/tiny-moe" and index.source["revision"] == commit
    assert index.source["path"] is None
    names = [f["name"] for f in index.source["files"]]
    assert not any(n.endswith(".py") for n in names)
    assert not (tmp_path / "a" / "modeling_evil.py").exists()
    for f in index.source["files"]:
        if f["name"].endswith(".safetensors"):  # LFS files: sha256 from the cache's blob names
            assert f["sha256"] == hashlib.sha256((src / f["name"]).read_bytes()).hexdigest()
    data = card_data(tmp_path / "a")
    assert data["base_model"] == "org/tiny-moe" and data["base_model_relation"] == "quantized"
    assert data["license"] == "mit"
    assert_records_match_source(src, tmp_path / "a")

    # The hub is gone: offline, the cached snapshot (kept: --keep-source) converts to the same
    # layout as the streamed conversion ...
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run(
        [*cmd, "-o", str(tmp_path / "b"), "--quiet"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    # ... and a repo that is not cached is a one-line error.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashmoe.convert.cli",
            "org/other",
            "-o",
            str(tmp_path / "c"),
            "--quiet",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith(
        "flashmoe-convert: error: org/other: download failed"
    )
    assert r.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in r.stderr
