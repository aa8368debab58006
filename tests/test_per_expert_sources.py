"""Checkpoints with one tensor per expert (older conversions: mixtral's ``experts.E.w1``,
qwen2-moe's ``experts.E.gate_proj``), which mlx-lm's sanitize ``mx.stack``s at load time: the
layout is byte for byte the one of the stacked checkpoint, and streams bit-identically to stock
mlx-lm on the per-expert checkpoint; a sanitize that does more than stack is refused in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import pytest
from flashmoe.convert import ConvertError, convert_checkpoint
from flashmoe.convert.plan import plan_layout
from identity import assert_identical
from test_convert_plan import upload_checkpoint
from test_convert_stream import comparable_index, disk_bytes, layout_files

from flashmoe.family_configs import tiny_config
from flashmoe.fixtures import write_per_expert

SHARD_BYTES = 128 * 1024  # mixtral: a layer's per-expert tensors span two or three shards
REPO = "flashmoe-test/per-expert-moe"


def _stacked(layout, family: str) -> tuple[Path, Path]:
    return layout(family, config=tiny_config(family), randomize_zeros=True)


def _shards_per_layer(src: Path) -> dict[str, set[str]]:
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    layers: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        if ".experts." in key:
            layers.setdefault(key.split(".experts.")[0], set()).add(shard)
    return layers


def _without_source(out: Path) -> dict:
    index = comparable_index(out)
    index.pop("source")
    return index


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_per_expert_checkpoint_converts_as_the_stacked_one(layout, family, tmp_path):
    src, stacked_out = _stacked(layout, family)
    per_expert = write_per_expert(src, tmp_path / "src", shard_bytes=SHARD_BYTES)
    assert not any(".switch_mlp." in k for k in _weight_map(per_expert))
    assert max(len(s) for s in _shards_per_layer(per_expert).values()) >= 2
    out = tmp_path / "out"
    convert_checkpoint(per_expert, out, progress=False, verify=True)
    assert layout_files(out) == layout_files(stacked_out)
    assert _without_source(out) == _without_source(stacked_out)
    assert_identical(per_expert, out, fractions=(0.0, 1.0))


def _weight_map(src: Path) -> dict[str, str]:
    return json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]


def test_streamed_and_planned_from_the_hub(hub, layout, tmp_path):
    """Shards fetched in layer order: a layer waits for all the shards its per-expert tensors
    are in (three here), written a shard at a time; every shard is released once converted, and
    ``--plan`` (headers only) counts the two shards a streamed conversion holds at once."""
    src, stacked_out = _stacked(layout, "mixtral")
    per_expert = write_per_expert(src, tmp_path / "src", shard_bytes=SHARD_BYTES)
    upload_checkpoint(hub, per_expert, REPO)
    shards = {p.name: p.stat().st_size for p in per_expert.glob("model-*.safetensors")}
    layer_bytes = max(sum(shards[s] for s in v) for v in _shards_per_layer(per_expert).values())
    assert layer_bytes > sum(sorted(shards.values())[-2:])  # one layer needs three shards
    plan = plan_layout(REPO, progress=False)
    local = plan_layout(per_expert, progress=False)
    # written a shard at a time: two shards held, though a layer needs three
    two = sum(sorted(shards.values())[-2:])
    assert plan.largest_shards_bytes == local.largest_shards_bytes == two
    assert (plan.expert_bytes, plan.layout_bytes, plan.disk_streaming) == (
        local.expert_bytes,
        local.layout_bytes,
        local.disk_streaming,
    )
    out = tmp_path / "out"
    cache = Path(hub.env["HF_HUB_CACHE"])
    peaks = []

    def on_request(method: str, path: str, headers) -> None:
        name = path.rsplit("/", 1)[-1]
        if method == "GET" and name in shards and "Range" not in headers:
            peaks.append(disk_bytes(cache, out) + shards[name])

    hub.on_request = on_request
    convert_checkpoint(REPO, out, progress=False)
    hub.on_request = None
    assert len(peaks) == len(shards)  # each shard fetched once
    assert not list(cache.rglob("model-*.safetensors")), "shards not released"
    assert max(peaks) <= plan.disk_streaming, (max(peaks), plan.disk_streaming)
    assert layout_files(out) == layout_files(stacked_out)


def test_stacked_from_computed_arrays_is_refused(layout, tmp_path):
    """deepseek_v3's sanitize reads compressed-tensors int4 experts (``weight_packed``,
    ``weight_scale``): it views the packed weights as uint32 and computes the biases
    (``-8 * scale``) before stacking them, so no per-expert tensor is the expert's bytes."""
    src, _ = _stacked(layout, "deepseek_v3")
    per_expert = write_per_expert(src, tmp_path / "src")
    weight_map = _weight_map(per_expert)
    expert_part = re.compile(r"(.*\.experts\.\d+\.\w+)\.(weight|scales|biases)$")
    for shard in sorted(per_expert.glob("model-*.safetensors")):
        weights = {}
        for key, value in mx.load(str(shard)).items():
            m = expert_part.match(key)
            if m is None:
                weights[key] = value
                continue
            del weight_map[key]
            base, part = m.groups()
            if part == "weight":
                weights[f"{base}.weight_packed"] = value.view(mx.int32)
                shape = [value.shape[0], value.shape[1] * 8]
                weights[f"{base}.weight_shape"] = mx.array(shape, mx.int32)
            elif part == "scales":
                weights[f"{base}.weight_scale"] = value
        mx.save_safetensors(str(shard), weights, {"format": "mlx"})
        weight_map.update(dict.fromkeys(weights, shard.name))
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (per_expert / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConvertError) as info:
        convert_checkpoint(per_expert, tmp_path / "out", progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{per_expert / 'config.json'}: "), message
    assert "model.layers.1.mlp.switch_mlp.gate_proj.weight is stacked by mlx-lm's sanitize " in (
        message
    )


def test_per_expert_tensor_of_another_dtype_is_refused(layout, tmp_path):
    """mx.stack promotes a float16 expert among bfloat16 ones: the stacked bytes are not the
    tensors' bytes any more, so the shard holding the odd one is named."""
    src, _ = _stacked(layout, "mixtral")
    per_expert = write_per_expert(src, tmp_path / "src")
    key = "model.layers.1.block_sparse_moe.experts.3.w2.scales"
    shard = per_expert / _weight_map(per_expert)[key]
    weights = mx.load(str(shard))
    weights[key] = weights[key].astype(mx.float16)
    mx.save_safetensors(str(shard), weights, {"format": "mlx"})
    with pytest.raises(ConvertError) as info:
        convert_checkpoint(per_expert, tmp_path / "out", progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{shard}: tensor {key}: F16["), message
