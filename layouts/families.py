"""Per-family tensor naming: where a checkpoint keeps its stacked routed experts."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The nine tensors of one expert, in record order. This order is part of the format.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")
COMPONENTS = tuple(f"{p}.{q}" for p in PROJECTIONS for q in PARTS)


@dataclass(frozen=True)
class Family:
    model_type: str
    # Regex over checkpoint keys; group "prefix" is everything before ".switch_mlp",
    # group "layer" the decoder layer index.
    expert_key: re.Pattern
    tested: bool


_SWITCH_MLP = re.compile(
    r"^(?P<prefix>(?:language_model\.)?model\.layers\.(?P<layer>\d+)\.mlp)"
    r"\.switch_mlp\.(?P<component>(?:gate|up|down)_proj\.(?:weight|scales|biases))$"
)

# Families whose mlx-lm model stacks routed experts in a SwitchGLU at
# `...layers.N.mlp.switch_mlp` with no expert biases.
FAMILIES: dict[str, Family] = {
    "qwen3_5_moe": Family("qwen3_5_moe", _SWITCH_MLP, tested=True),
    "qwen3_moe": Family("qwen3_moe", _SWITCH_MLP, tested=True),
    "qwen3_next": Family("qwen3_next", _SWITCH_MLP, tested=True),
}


def text_config(config: dict) -> dict:
    """The dict holding the language model's fields (``text_config`` if present); ValueError
    if the config or its ``text_config`` is not an object."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a JSON object, got {type(config).__name__}")
    tc = config.get("text_config", config)
    if not isinstance(tc, dict):
        raise ValueError(f"config text_config must be a JSON object, got {type(tc).__name__}")
    return tc


def family_for(config: dict) -> Family:
    """The family of a checkpoint config, or ValueError naming the supported ones."""
    text_config(config)  # a config (or text_config) that is not an object fails here
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {supported})")
    return FAMILIES[model_type]


def match_expert_key(family: Family, key: str) -> tuple[int, str, str] | None:
    """``(layer, prefix, component)`` if ``key`` names a stacked expert tensor, else None."""
    m = family.expert_key.match(key)
    if m is None:
        return None
    return int(m["layer"]), m["prefix"], m["component"]
