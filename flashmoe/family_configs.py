"""Tiny configs of mlx-lm's MoE families, for random-weight test checkpoints (``make_checkpoint``).

A config is built from the family's own ``ModelArgs``: every field named in ``SMALL`` gets that
small value, the rest keep mlx-lm's defaults, and ``OVERRIDES`` adds what a family needs besides
(required fields, nested text configs, layer patterns). Three decoder layers: families with dense
first layers get one dense layer and two MoE layers.
"""

from __future__ import annotations

import dataclasses
import importlib

SMALL: dict[str, object] = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts": 16,
    "n_routed_experts": 16,
    "num_local_experts": 16,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "shared_expert_intermediate_size": 64,
    "shared_intermediate_size": 64,
    "kv_lora_rank": 32,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "use_qk_norm": True,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "partial_rotary_factor": 0.5,
    "rotary_dim": 8,
    "sliding_window": 16,
}

_SWA = ["sliding_attention", "full_attention", "sliding_attention"]

OVERRIDES: dict[str, dict] = {
    "Klear": {"mlp_only_layers": [], "decoder_sparse_step": 1},
    "afmoe": {"layer_types": _SWA, "num_dense_layers": 1, "num_shared_experts": 1},
    "bailing_moe": {"num_shared_experts": 1},
    "bailing_moe_linear": {"num_shared_experts": 1, "layer_group_size": 2, "group_norm_size": 1},
    "bailing_hybrid": {"num_shared_experts": 1, "layer_group_size": 2, "group_norm_size": 1},
    "ernie4_5_moe": {
        "use_bias": False,
        "moe_num_experts": 16,
        "moe_k": 2,
        "moe_layer_start_index": 1,
        "moe_num_shared_experts": 1,
    },
    "deepseek_v2": {"rope_scaling": {"type": "yarn", "factor": 1.0}},
    "granitemoe": {
        "logits_scaling": 2.0,
        "attention_multiplier": 0.25,
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
    },
    "granitemoehybrid": {
        "logits_scaling": 2.0,
        "attention_multiplier": 0.25,
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
        "layer_types": ["mamba", "attention", "mamba"],
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_proj_bias": False,
        "mamba_d_state": 16,
        "mamba_d_conv": 4,
        "mamba_n_groups": 1,
        "mamba_conv_bias": True,
    },
    "hunyuan": {
        "moe_topk": 2,
        "num_shared_expert": 1,
        "use_mixed_mlp_moe": True,
        "use_cla": False,
        "cla_share_factor": 2,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"},
    },
    "mellum": {
        "layer_types": _SWA,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    "step3p5": {
        "num_attention_groups": 2,
        "moe_num_experts": 16,
        "moe_top_k": 2,
        "share_expert_dim": 64,
        "moe_layers_enum": "1,2",
        "layer_types": _SWA,
    },
    "mistral4": {
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 4096,
        },
    },
    "lfm2_moe": {
        "use_expert_bias": True,
        "num_dense_layers": 1,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "layer_types": ["conv", "full_attention", "conv"],
    },
    "jamba": {
        "attn_layer_offset": 1,
        "attn_layer_period": 2,
        "expert_layer_offset": 1,
        "expert_layer_period": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_expand": 2,
    },
    "nemotron_h": {
        "hybrid_override_pattern": ["M", "E", "*", "E"],
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "mamba_proj_bias": False,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        "moe_shared_expert_intermediate_size": 64,
    },
    "kimi_linear": {
        "linear_attn_config": {"kda_layers": [1, 3], "num_heads": 4, "head_dim": 16},
        "model_max_length": 4096,
        "num_experts_per_token": 2,
        "num_shared_experts": 1,
    },
    "gemma4_text": {
        "global_head_dim": 32,
        "vocab_size_per_layer_input": 512,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 16,
        "enable_moe_block": True,
        "top_k_experts": 2,
        "layer_types": _SWA,
    },
    "minimax_m3_vl": {
        "text_config": {
            "dense_intermediate_size": 128,
            "intermediate_size": 64,
            "mlp_layer_types": ["dense", "sparse", "sparse"],
        }
    },
    "mimo_v2_flash": {
        "hybrid_layer_pattern": [1, 0, 1],
        "moe_layer_freq": [0, 1, 1],
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "sliding_window_size": 16,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "layernorm_epsilon": 1e-5,
        "swa_rope_theta": 10000.0,
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 2,
        "swa_head_dim": 16,
        "swa_v_head_dim": 16,
        "n_shared_experts": None,
    },
    "longcat_flash": {
        "attention_method": "MLA",
        "zero_expert_type": "identity",
        "ffn_hidden_size": 128,
        "moe_topk": 2,
        "expert_ffn_hidden_size": 64,
        "zero_expert_num": 4,
        "num_layers": 2,
        "mla_scale_q_lora": True,
        "mla_scale_kv_lora": True,
    },
    "deepseek_v41": {
        "head_dim": 32,
        "o_groups": 2,  # o_a_proj rows of 4 x 32 / 2 = 64: quantizable
        "o_lora_rank": 32,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 8,
        "candidate_topk_blocks": 4,
        "hc_mult": 2,
        "hc_sinkhorn_iters": 3,
        "sliding_window": 16,
    },
    "phixtral": {
        "num_vocab": 512,
        "model_dim": 64,
        "num_heads": 4,
        "num_layers": 2,
        "num_local_experts": 16,
    },
    "exaone_moe": {
        "num_shared_experts": 1,
        "layer_types": _SWA,
        "is_moe_layer": [False, True, True],
    },
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "llama4": {
        "text_config": {
            "attention_chunk_size": 16,
            "interleave_moe_layer_step": 2,
            "intermediate_size": 64,
            "intermediate_size_mlp": 128,
            "model_type": "llama4_text",
            "num_experts_per_tok": 1,
            "num_hidden_layers": 4,
            "no_rope_layers": [1, 1, 1, 0],
        }
    },
    "kimi_k3": {
        "text_config": {
            "linear_attn_config": {
                "kda_layers": [1, 3],
                "num_heads": 4,
                "head_dim": 16,
                "short_conv_kernel_size": 4,
            },
            "num_experts_per_token": 2,
            "num_shared_experts": 1,
        }
    },
}

# config model types that mlx-lm maps to another module (MODEL_REMAPPING), tested as such
ALIASES = {"kimi_k2": "deepseek_v3", "minimax_m2": "minimax", "joyai_llm_flash": "deepseek_v3"}


def tiny_config(name: str) -> dict:
    """A tiny ``config.json`` for mlx-lm module ``name`` (or an alias in ALIASES)."""
    from .fixtures import FAMILY_CONFIGS, tiny_text_config

    if name in FAMILY_CONFIGS:
        return tiny_text_config(name, hidden=64, moe_intermediate=64, num_experts=16, top_k=2)
    module = ALIASES.get(name, name)
    classes = importlib.import_module(f"mlx_lm.models.{module}")
    overrides = dict(OVERRIDES.get(module, {}))
    config: dict = {"model_type": name, **_small(classes.ModelArgs)}
    if hasattr(classes, "TextArgs"):  # a multimodal config: the language model is nested
        text = {**_small(classes.TextArgs), **overrides.pop("text_config", {})}
        config["text_config"] = text
    config.update(overrides)
    return config


def _small(args_class) -> dict:
    return {f.name: SMALL[f.name] for f in dataclasses.fields(args_class) if f.name in SMALL}
