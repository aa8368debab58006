"""Every mlx-lm MoE family: a tiny checkpoint converted and streamed bit-identically, or refused.

The cases come from the installed mlx-lm: each ``mlx_lm/models/*.py`` that mentions SwitchGLU or
SwitchMLP, each family in flashmoe's table, and each model type mlx-lm maps onto one of them. A
module missing from ``flashmoe.layouts.families.FAMILIES`` fails ("no entry"), so a family added to
mlx-lm shows up here; one the table refuses is skipped with the table's reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx_lm.models
import pytest
from flashmoe.convert import ConvertError, convert_checkpoint
from flashmoe.layouts import FAMILIES, read_index
from identity import assert_identical

from flashmoe.family_configs import ALIASES, tiny_config

_SWITCH = re.compile(r"\bSwitch(?:GLU|MLP)\b")


def moe_modules() -> list[str]:
    """mlx-lm model modules whose experts go through SwitchGLU / SwitchMLP."""
    models = Path(mlx_lm.models.__file__).parent
    return sorted(
        p.stem
        for p in models.glob("*.py")
        if p.stem != "switch_layers" and _SWITCH.search(p.read_text())
    )


CASES = sorted(set(moe_modules()) | set(FAMILIES) | set(ALIASES))


@pytest.mark.parametrize("name", CASES)
def test_family(layout, name):
    module = ALIASES.get(name, name)
    family = FAMILIES.get(module)
    if family is None:
        pytest.fail(f"no entry for {module} in flashmoe.layouts.families.FAMILIES")
    if not family.supported:
        pytest.skip(f"{module}: {family.why}")
    src, out = layout(name, config=tiny_config(name), randomize_zeros=True)
    index = read_index(out)
    assert index.model_type == name
    assert_identical(src, out)


@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss"])
def test_family_in_mxfp4(layout, name):
    """gpt-oss is published with MXFP4 experts; DeepSeek in MXFP4 is the no-biases case with
    dense first layers and shared experts."""
    src, out = layout(
        name, config=tiny_config(name), randomize_zeros=True, mode="mxfp4", bits=None,
        group_size=None,
    )  # fmt: skip
    assert read_index(out).version == 2
    assert_identical(src, out, fractions=(0.0, 1.0))


def test_refused_family_is_one_line(checkpoint, tmp_path):
    import json
    import shutil

    refused = next(n for n, f in sorted(FAMILIES.items()) if not f.supported)
    src = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3_moe"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, model_type=refused)))
    with pytest.raises(ConvertError) as info:
        convert_checkpoint(src, tmp_path / "out", progress=False)
    assert str(info.value) == (
        f"{src / 'config.json'}: unsupported model_type {refused!r}: {FAMILIES[refused].why}"
    )


def test_multimodal_checkpoint_keeps_the_language_model(checkpoint, tmp_path, capsys):
    """Tensors mlx-lm's model discards (a vision tower, MTP layers) are left out of the layout,
    and said so; the text model streams bit-identically."""
    import json
    import shutil

    import mlx.core as mx

    src = tmp_path / "src"
    shutil.copytree(checkpoint("qwen3_5_moe", **TINY_QWEN), src)
    extra = {"vision_tower.blocks.0.w": mx.ones((4,)), "mtp.layers.0.w": mx.ones((3,))}
    mx.save_safetensors(str(src / "model-vision.safetensors"), extra, {"format": "mlx"})
    index_path = src / "model.safetensors.index.json"
    weight_map = json.loads(index_path.read_text())
    weight_map["weight_map"].update(dict.fromkeys(extra, "model-vision.safetensors"))
    index_path.write_text(json.dumps(weight_map))
    out = tmp_path / "out"
    convert_checkpoint(src, out, progress=True)
    assert "leaving out 2 tensors that mlx-lm's qwen3_5_moe model does not load: " in (
        capsys.readouterr().err
    )
    dense = mx.load(str(out / "model-dense.safetensors"))
    assert not set(extra) & set(dense)
    assert_identical(src, out, fractions=(0.0,))


TINY_QWEN = {"hidden": 64, "moe_intermediate": 64, "num_experts": 16, "top_k": 2}
