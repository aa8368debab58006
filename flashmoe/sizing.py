"""Model-aware memory sizing: the KV cache a model needs and how many expert slots fit a budget.

Shared by the runtime (``--memory-budget``) and the converter's ``--plan``, so both give the same bank."""

from __future__ import annotations

import os

GiB = 1 << 30


def physical_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_cache_bytes(text_config: dict, tokens: int, sequences: int = 1, dtype_bytes: int = 2) -> int:
    """An upper estimate of the KV cache for ``tokens`` tokens in all (full-attention layers) plus
    the fixed-size recurrent state of the linear-attention layers, once per sequence."""
    layers = text_config.get("num_hidden_layers", 0)
    interval = text_config.get("full_attention_interval", 1)
    full = layers // interval if interval else layers
    heads = text_config.get("num_key_value_heads", text_config.get("num_attention_heads", 1))
    head_dim = text_config.get("head_dim") or text_config.get("hidden_size", 0) // max(
        1, text_config.get("num_attention_heads", 1)
    )
    kv = 2 * full * heads * head_dim * tokens * dtype_bytes
    linear = layers - full
    v_heads = text_config.get("linear_num_value_heads", 0)
    state = (
        linear
        * v_heads
        * text_config.get("linear_key_head_dim", 0)
        * text_config.get("linear_value_head_dim", 0)
        * 4
    )
    return kv + state * sequences


def slots_for_budget(
    budget: int,
    *,
    dense_bytes: int,
    kv_bytes: int,
    expert_bytes: int,
    moe_layers: int,
    num_experts: int,
    min_slots: int,
    overhead: int = 256 << 20,
) -> int:
    """Expert slots per layer that fit ``budget`` after the dense weights, KV cache and overhead.

    Raises ValueError (with the numbers) when not even ``min_slots`` fit.
    """
    left = budget - dense_bytes - kv_bytes - overhead
    per_slot = expert_bytes * moe_layers
    slots = min(num_experts, left // per_slot) if left > 0 else 0
    if slots < min_slots:
        need = dense_bytes + kv_bytes + overhead + min_slots * per_slot
        raise ValueError(
            f"memory budget {budget / GiB:.2f} GiB cannot hold the dense weights "
            f"({dense_bytes / GiB:.2f} GiB), KV cache ({kv_bytes / GiB:.2f} GiB) and {min_slots} "
            f"expert slots per layer; at least {need / GiB:.2f} GiB is needed"
        )
    return int(slots)


def default_budget(ram_bytes: int) -> int:
    """The budget ``flashmoe-run`` uses without ``--memory-budget``: 75 % of RAM."""
    return int(0.75 * ram_bytes)
