"""Per-family facts: which mlx-lm model types flashmoe streams, and how an expert record is laid out."""

from __future__ import annotations

import re
from dataclasses import dataclass

# The nine tensors of one expert of a version-1 layout, in record order (affine SwitchGLU).
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")
COMPONENTS = tuple(f"{p}.{q}" for p in PROJECTIONS for q in PARTS)

# Version 2: a record holds, per projection in this order, the parts it has in this order.
# SwitchGLU projections, then SwitchMLP ones (a layout has one of the two sets).
GLU_PROJECTIONS = PROJECTIONS
MLP_PROJECTIONS = ("fc1", "fc2")
RECORD_PARTS = ("weight", "scales", "biases", "global_scale", "bias")

# Quantization modes of mlx's quantize / gather_qmm: allowed bits and group sizes (None: any > 0).
MODES: dict[str, tuple[tuple[int, ...], tuple[int, ...] | None]] = {
    "affine": ((2, 3, 4, 5, 6, 8), None),
    "mxfp4": ((4,), (32,)),
    "mxfp8": ((8,), (32,)),
    "nvfp4": ((4,), (16,)),
}


def record_parts(mode: str, *, global_scale: bool = False, bias: bool = False) -> tuple[str, ...]:
    """The parts one projection stores in a record, in order, for a quantization ``mode``."""
    parts = ["weight", "scales"]
    if mode == "affine":
        parts.append("biases")
    if global_scale:
        parts.append("global_scale")
    if bias:
        parts.append("bias")
    return tuple(parts)


@dataclass(frozen=True)
class Family:
    """An mlx-lm model module (``mlx_lm/models/<name>.py``) whose experts go through SwitchGLU/MLP."""

    name: str
    supported: bool
    why: str = ""  # supported: what is special about it; refused: why (one line)


def _ok(name: str, why: str = "") -> Family:
    return Family(name, True, why)


def _no(name: str, why: str) -> Family:
    return Family(name, False, why)


# Every mlx-lm model module whose experts are a SwitchGLU or SwitchMLP (tests/test_families.py
# derives its cases from the installed mlx-lm and fails on a module missing here), plus the
# modules that reuse another's MoE block. Keyed by module name: config model types are mapped
# to it the way mlx-lm maps them (MODEL_REMAPPING: kimi_k2 -> deepseek_v3, minimax_m2 -> minimax).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _ok("qwen3_5_moe", "Qwen3.5 MoE; text model of a multimodal config"),
        _ok("qwen3_moe"),
        _ok("qwen3_next"),
        _ok("Klear"),
        _ok("afmoe", "dense first layers"),
        _ok("bailing_hybrid", "hybrid linear attention"),
        _ok("bailing_moe", "dense first layers"),
        _ok("bailing_moe_linear", "hybrid linear attention"),
        _ok("bailing_moe_v3"),
        _ok("deepseek"),
        _ok("deepseek_v2"),
        _ok("deepseek_v3", "DeepSeek-V3/R1, Kimi-K2: dense first layers, shared experts"),
        _ok("deepseek_v32"),
        _ok("deepseek_v41"),
        _ok("dots1", "dense first layers, experts under mlp.experts"),
        _ok("ernie4_5_moe", "MoE from moe_layer_start_index"),
        _ok("exaone_moe", "per-layer is_moe_layer"),
        _ok("gemma4_text"),
        _ok("glm4_moe", "dense first layers, shared experts"),
        _ok("glm4_moe_lite"),
        _ok("gpt_oss", "expert linear biases, clamped SwiGLU; MXFP4 experts as published"),
        _ok("granitemoe"),
        _ok("granitemoehybrid", "Mamba hybrid"),
        _ok("hunyuan"),
        _ok("jamba", "Mamba hybrid, MoE every other layer"),
        _ok("kimi_k3", "nested text_config, linear-attention hybrid"),
        _ok("kimi_linear", "linear-attention hybrid"),
        _ok("laguna"),
        _ok("lfm2_moe", "conv hybrid, dense first layers"),
        _ok("llama4", "MoE every other layer (interleave_moe_layer_step), nested text_config"),
        _ok("longcat_flash", "zero (identity) experts routed to expert 0 with weight 0"),
        _ok("mellum"),
        _ok("mimo_v2_flash", "sliding-window hybrid, dense first layers"),
        _ok("minimax", "MiniMax-M2; experts under block_sparse_moe"),
        _ok("minimax_m3_vl", "text model of a multimodal config; dense and sparse layers"),
        _ok("mistral4", "dense first layers, shared experts"),
        _ok("mixtral", "experts under block_sparse_moe"),
        _no(
            "muse_spark",
            "mlx-lm keeps the experts of its first and last layers unquantized, and a layout "
            "holds one expert geometry (the others are quantized); its experts also hold a norm "
            "(experts.post_expert_norm) that flashmoe does not stream",
        ),
        _ok("nemotron_h", "SwitchMLP experts (fc1/fc2), Mamba hybrid"),
        _ok("olmoe"),
        _ok("phimoe"),
        _ok("phixtral", "SwitchMLP experts with biases, transformer.h.N keys"),
        _ok("qwen2_moe", "shared expert"),
        _ok("step3p5", "MoE layers from moe_layers_enum"),
    )
}

# Config keys holding the routed experts per token, first match wins.
TOP_K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_topk",
    "top_k_experts",
    "moe_k",
    "moe_top_k",
)


def text_config(config: dict) -> dict:
    """The dict holding the language model's fields (``text_config`` if present); ValueError
    if the config or its ``text_config`` is not an object."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a JSON object, got {type(config).__name__}")
    tc = config.get("text_config", config)
    if not isinstance(tc, dict):
        raise ValueError(f"config text_config must be a JSON object, got {type(tc).__name__}")
    return tc


def family_named(module: str, model_type: object) -> Family:
    """The supported family of mlx-lm module ``module`` (``model_type`` maps to it), or ValueError
    saying why not."""
    family = FAMILIES.get(module)
    alias = "" if module == model_type else f" (mlx-lm model {module})"
    if family is None:
        supported = ", ".join(sorted(n for n, f in FAMILIES.items() if f.supported))
        raise ValueError(
            f"unsupported model_type {model_type!r}{alias}: not a Mixture-of-Experts family "
            f"flashmoe knows (supported: {supported})"
        )
    if not family.supported:
        raise ValueError(f"unsupported model_type {model_type!r}{alias}: {family.why}")
    return family


def top_k_of(config: dict) -> int | None:
    """Routed experts per token from a (text) config, if it names them."""
    tc = text_config(config)
    for key in TOP_K_KEYS:
        v = tc.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


# mlx-lm names the decoder layer list ``layers`` (phixtral: ``transformer.h``)
_LAYER_IN_PATH = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


def layer_of_module_path(path: str) -> int | None:
    """The decoder layer index in an mlx-lm module path like ``...layers.12.mlp.switch_mlp``."""
    m = _LAYER_IN_PATH.search(path)
    return int(m.group(1)) if m else None
