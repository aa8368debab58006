"""flashmoe-convert on bad input, and `flashmoe-convert verify` on damaged layouts.

Every failure is one line ``flashmoe-convert: error: <file>: <problem>`` on stderr, a non-zero exit
and no layout that passes verify.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from flashmoe.convert import ConvertError, convert_checkpoint
from flashmoe.convert.cli import main
from flashmoe.layouts import INDEX_FILE, LayoutError, read_index

from flashmoe.verify import verify_layout


def copy_of(checkpoint, tmp_path: Path, family: str = "qwen3_moe", **opts) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(checkpoint(family, **opts), dst)
    return dst


def cli(capsys, *args) -> str:
    """Run the CLI in-process; return its one-line error (after checking exit code and format)."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("flashmoe-convert: error: ") and err.count("\n") == 1, err
    return err.removeprefix("flashmoe-convert: error: ").strip()


def assert_no_layout(out: Path) -> None:
    with pytest.raises(LayoutError):
        verify_layout(out)


def shards(src: Path) -> list[Path]:
    return sorted(src.glob("model-*.safetensors"))


def rewrite_header(path: Path, edit) -> None:
    """Rewrite a shard's JSON header through ``edit(header)``, keeping its data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def edit_config(src: Path, edit) -> None:
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))


def test_missing_shard(checkpoint, tmp_path, capsys):
    src = copy_of(checkpoint, tmp_path)
    victim = shards(src)[2]
    victim.unlink()
    assert cli(capsys, src, "-o", tmp_path / "out") == f"{victim}: missing shard"
    assert_no_layout(tmp_path / "out")


def test_truncated_shard(checkpoint, tmp_path, capsys):
    src = copy_of(checkpoint, tmp_path)
    victim = shards(src)[1]
    os.truncate(victim, victim.stat().st_size - 100)
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert err.startswith(f"{victim}: truncated: ")
    assert_no_layout(tmp_path / "out")


def _first_tensor(header: dict) -> str:
    return min(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )


def _grow(header):  # offsets claim more bytes than the shape needs
    header[_first_tensor(header)]["data_offsets"][1] += 4


def _shape(header):  # shape claims more elements than the offsets hold
    header[_first_tensor(header)]["shape"][0] += 1


def _overlap(header):  # two tensors share bytes
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0]
    )
    a, b = header[names[0]], header[names[1]]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _past_end(header):  # a tensor placed beyond the end of the file
    name = _first_tensor(header)
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin + 10**7, end + 10**7]


def _garbage(header):
    header.clear()
    header["x"] = "not a tensor"


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_grow, "hold"),
        (_shape, "needs"),
        (_overlap, "overlap"),
        (_past_end, "truncated"),
        (_garbage, "malformed header entry"),
    ],
)
def test_header_lies(checkpoint, tmp_path, capsys, edit, problem):
    src = copy_of(checkpoint, tmp_path)
    victim = shards(src)[3]
    rewrite_header(victim, edit)
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert err.startswith(f"{victim}: ") and problem in err
    assert_no_layout(tmp_path / "out")


def test_header_length_lies(checkpoint, tmp_path, capsys):
    src = copy_of(checkpoint, tmp_path)
    victim = shards(src)[0]
    with open(victim, "r+b") as f:
        f.write(struct.pack("<Q", victim.stat().st_size))
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert err.startswith(f"{victim}: truncated: header of ")


def test_weight_map_lies(checkpoint, tmp_path, capsys):
    src = copy_of(checkpoint, tmp_path)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k in index["weight_map"] if k.endswith("switch_mlp.up_proj.scales"))
    names = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(n for n in names if n != index["weight_map"][key])
    index_path.write_text(json.dumps(index))
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert f"tensor {key} listed in model.safetensors.index.json is not in its header" in err


def test_no_moe_layers(checkpoint, tmp_path, capsys):
    src = copy_of(checkpoint, tmp_path)
    weights = {}
    for shard in shards(src):
        weights.update(mx.load(str(shard)))
        shard.unlink()
    (src / "model.safetensors.index.json").unlink()
    dense = {k: v for k, v in weights.items() if ".switch_mlp." not in k}
    mx.save_safetensors(str(src / "model.safetensors"), dense, metadata={"format": "mlx"})
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert err.startswith(f"{src / 'config.json'}: mlx-lm cannot load this checkpoint"), err
    assert "switch_mlp" in err
    assert_no_layout(tmp_path / "out")


def test_unsupported_model_type(checkpoint, tmp_path, capsys):
    src = copy_of(checkpoint, tmp_path)
    edit_config(src, lambda c: c.update(model_type="llama"))
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert err.startswith(
        f"{src / 'config.json'}: unsupported model_type 'llama': not a Mixture-of-Experts family "
        "flashmoe knows (supported: "
    ), err


def _no_block(c):
    del c["quantization"]
    c.pop("quantization_config", None)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_no_block, "unsupported quantization: no 'quantization' block"),
        (
            lambda c: c["quantization"].update({"model.layers.2.mlp.switch_mlp.down_proj": False}),
            "parameters not in model: model.layers.2.mlp.switch_mlp.down_proj.biases",
        ),
        (
            lambda c: c["quantization"].update(
                {"model.layers.2.mlp.switch_mlp.down_proj": {"bits": 8, "group_size": 64}}
            ),
            "model.layers.2.mlp.switch_mlp.down_proj.weight",  # mlx-lm: shape mismatch
        ),
    ],
)
def test_unsupported_quantization(checkpoint, tmp_path, capsys, edit, problem):
    src = copy_of(checkpoint, tmp_path)
    edit_config(src, edit)
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert err.startswith(f"{src}") and problem in err, err
    assert_no_layout(tmp_path / "out")


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["quantization"].update(mode="mxfp4"),
        lambda c: c["quantization"].update(bits=8),
        lambda c: c["quantization"].update(group_size=32),
    ],
)
def test_default_quantization_is_read_from_the_tensors(checkpoint, tmp_path, edit):
    """Like mlx-lm, the quantization of a path the block does not name comes from its tensors."""
    src = copy_of(checkpoint, tmp_path)
    edit_config(src, edit)
    index = convert_checkpoint(src, tmp_path / "out", progress=False)
    assert {(c.bits, c.group_size, c.mode) for c in index.components} == {(4, 64, "affine")}


def _mixed_checkpoint(checkpoint, tmp_path: Path, override_all: bool) -> Path:
    """A qwen3_moe checkpoint whose layer 1 (or every layer) has 8-bit experts, per-path overrides."""
    four = checkpoint("qwen3_moe")
    eight = checkpoint("qwen3_moe", bits=8)
    src = tmp_path / "mixed"
    src.mkdir()
    weights = {}
    for shard in shards(four):
        weights.update(mx.load(str(shard)))
    layers = range(4) if override_all else [1]
    for shard in shards(eight):
        for k, v in mx.load(str(shard)).items():
            if ".switch_mlp." in k and any(f"layers.{i}." in k for i in layers):
                weights[k] = v
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((four / "config.json").read_text())
    for i in layers:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            config["quantization"][f"model.layers.{i}.mlp.switch_mlp.{proj}"] = {
                "group_size": 64,
                "bits": 8,
            }
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_layers_with_different_geometry(checkpoint, tmp_path, capsys):
    src = _mixed_checkpoint(checkpoint, tmp_path, override_all=False)
    err = cli(capsys, src, "-o", tmp_path / "out")
    assert "layer 1 has a different expert geometry or quantization than layer 0" in err


def test_per_path_overrides_are_read(checkpoint, tmp_path):
    src = _mixed_checkpoint(checkpoint, tmp_path, override_all=True)
    index = convert_checkpoint(src, tmp_path / "out", progress=False)
    assert {c.bits for c in index.components} == {8}
    assert index.config["quantization"]["bits"] == 4


def test_source_not_found(tmp_path, capsys):
    assert cli(capsys, tmp_path / "nope", "-o", tmp_path / "out") == (
        f"{tmp_path / 'nope'}: no such directory (and not a Hugging Face repo id)"
    )
    (tmp_path / "empty").mkdir()
    assert (
        cli(capsys, tmp_path / "empty", "-o", tmp_path / "out")
        == f"{tmp_path / 'empty' / 'config.json'}: missing"
    )


def test_bad_alignment(checkpoint, tmp_path, capsys):
    err = cli(capsys, checkpoint("qwen3_moe"), "-o", tmp_path / "out", "--alignment", "5000")
    assert err == "--alignment: alignment must be a power of two >= 4096, got 5000"


def test_non_empty_output(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = cli(capsys, checkpoint("qwen3_moe"), "-o", out)
    assert err.startswith(f"{out}: output directory is not empty")
    assert sorted(os.listdir(out)) == ["notes.txt"]
    # A finished layout of another source is not overwritten either.
    done = tmp_path / "done"
    convert_checkpoint(checkpoint("qwen3_moe"), done, progress=False)
    before = {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()}
    err = cli(capsys, checkpoint("qwen3_next"), "-o", done)
    assert err.startswith(
        f"{done}: holds a finished layout of another source or with other options"
    )
    assert err.endswith("delete it or choose another output directory")
    assert {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()} == before
    (tmp_path / "file").write_text("x")
    assert (
        cli(capsys, checkpoint("qwen3_moe"), "-o", tmp_path / "file")
        == f"{tmp_path / 'file'}: exists and is not a directory"
    )


def test_finished_layout_of_a_changed_source_is_not_reused(checkpoint, tmp_path, capsys):
    """A source whose files were replaced by others of the same size is a different source."""
    src = copy_of(checkpoint, tmp_path)
    out = tmp_path / "out"
    convert_checkpoint(src, out, progress=False)
    before = tree_bytes(out)
    victim = shards(src)[0]
    raw = bytearray(victim.read_bytes())
    raw[-64:] = bytes(255 - b for b in raw[-64:])  # new weights, same size, same header
    st = victim.stat()
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    err = cli(capsys, src, "-o", out)
    assert err == (
        f"{out}: holds a finished layout of another source or with other options "
        f"(source file {victim.name} changed since); "
        "refusing to overwrite it: delete it or choose another output directory"
    )
    assert tree_bytes(out) == before
    # Another alignment is another conversion too.
    victim.write_bytes(bytes(raw))
    with pytest.raises(ConvertError, match="alignment 16384, asked for 4096"):
        convert_checkpoint(src, out, progress=False, alignment=4096)


def test_damaged_finished_layout_is_not_reported_as_converted(checkpoint, tmp_path, capsys):
    src = checkpoint("qwen3_moe")
    out = tmp_path / "out"
    convert_checkpoint(src, out, progress=False)
    convert_checkpoint(src, out, progress=False)  # intact: "already converted"
    layer = out / "experts" / "layer-001.bin"
    saved = layer.read_bytes()
    layer.unlink()
    err = cli(capsys, src, "-o", out)
    assert err == (
        f"{out}: holds a finished layout of this source that is damaged "
        f"({layer}: missing (layer 1)); delete it or choose another output directory"
    )
    assert not layer.exists()
    layer.write_bytes(saved)
    (out / "config.json").write_text("{}")  # a copied file of another size
    with pytest.raises(ConvertError, match="that is damaged .*config.json: 2 bytes"):
        convert_checkpoint(src, out, progress=False)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_error_is_one_line_without_traceback(checkpoint, tmp_path):
    src = copy_of(checkpoint, tmp_path)
    victim = shards(src)[0]
    victim.unlink()
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.convert.cli", str(src), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr == f"flashmoe-convert: error: {victim}: missing shard\n"


# --- a full disk ---


@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs("2m")


def test_full_disk(checkpoint, tmp_path, small_tmpfs, capsys):
    src = checkpoint("qwen3_moe")  # its layout is about 2.4 MB
    out = small_tmpfs / "out"
    err = cli(capsys, src, "-o", out)
    assert err.startswith(f"{out}: not enough free space: the layout needs ")
    assert not (out / INDEX_FILE).exists()
    # Without the up-front check the disk fills mid-way: the write fails cleanly, no index.
    with pytest.raises(ConvertError, match="no space left on device") as info:
        convert_checkpoint(src, out, progress=False, _check_free_space=False)
    assert str(info.value).startswith(str(out))
    assert not (out / INDEX_FILE).exists()
    assert_no_layout(out)


# --- `flashmoe-convert verify` on damaged layouts ---


@pytest.fixture
def damaged(layout, tmp_path):
    _, out = layout("qwen3_moe")
    copy = tmp_path / "layout"
    shutil.copytree(out, copy)
    return copy


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_verify_names_layer_and_expert(damaged, capsys):
    """[R22]"""
    assert main(["verify", str(damaged), "--quiet"]) == 0
    index = read_index(damaged)
    layer = index.layers[2]
    flip(damaged / layer.file, 5 * index.record_size + index.component("up_proj.scales").offset + 3)
    err = cli(capsys, "verify", damaged, "--quiet")
    assert err.startswith(f"{damaged / layer.file}: layer {layer.layer} expert 5: sha256 mismatch")
    assert main(["verify", str(damaged), "--sizes-only", "--quiet"]) == 0  # sizes are still fine


def test_verify_padding_and_sizes(damaged, capsys):
    """[R22] the padding, [R21] sizes."""
    index = read_index(damaged)
    assert index.record_size > index.expert_bytes
    layer = index.layers[1]
    flip(damaged / layer.file, 9 * index.record_size + index.expert_bytes + 10)
    assert cli(capsys, "verify", damaged, "--quiet") == (
        f"{damaged / layer.file}: layer {layer.layer} expert 9: padding is not zero"
    )
    os.truncate(damaged / layer.file, layer.size - 1)
    assert cli(capsys, "verify", damaged, "--sizes-only") == (
        f"{damaged / layer.file}: {layer.size - 1} bytes, the index says {layer.size} (layer {layer.layer})"
    )
    (damaged / layer.file).unlink()
    assert (
        cli(capsys, "verify", damaged, "--quiet")
        == f"{damaged / layer.file}: missing (layer {layer.layer})"
    )


def test_verify_dense_and_copied_files(damaged, capsys):
    """[R23]"""
    flip(damaged / "model-dense.safetensors", 5000)
    assert cli(capsys, "verify", damaged, "--quiet").startswith(
        f"{damaged / 'model-dense.safetensors'}: sha256 mismatch"
    )
    flip(damaged / "model-dense.safetensors", 5000)
    (damaged / "tokenizer.json").write_text("{}")
    assert cli(capsys, "verify", damaged, "--quiet").startswith(f"{damaged / 'tokenizer.json'}: ")
    (damaged / INDEX_FILE).unlink()
    assert cli(capsys, "verify", damaged).startswith(f"{damaged / INDEX_FILE}: missing")


def test_convert_verify_compares_with_source(layout, tmp_path):
    """The --verify pass reads the written records back and compares them with the source."""
    from flashmoe.convert.geometry import plan_experts
    from flashmoe.convert.safetensors_source import open_checkpoint
    from flashmoe.convert.writers import compare_layer

    src, out = layout("qwen3_moe")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    plan = plan_experts(open_checkpoint(src))
    index = read_index(copy)
    entry, layer = plan.layers[3], index.layers[3]
    args = (src, entry.tensors, plan.components, plan.num_experts, index.record_size)
    compare_layer(*args, copy / layer.file, 3, lambda n: None)
    flip(copy / layer.file, 12 * index.record_size + 7)
    with pytest.raises(
        ConvertError, match="layer 3 expert 12: written bytes differ from the source"
    ):
        compare_layer(*args, copy / layer.file, 3, lambda n: None)
