"""Device memory: how much there is, and MLX's memory limits (model-aware sizing is
``flashmoe.sizing``)."""

from __future__ import annotations

import os

import mlx.core as mx

GiB = 1 << 30


def physical_memory() -> int:
    """Bytes of physical memory on this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def set_limits(wired_bytes: int | None = None) -> None:
    """On Metal, wire the resident set (dense + bank) so it is not paged out; no-op on the CPU."""
    if wired_bytes and mx.metal.is_available():
        mx.set_wired_limit(
            min(wired_bytes, int(mx.device_info()["max_recommended_working_set_size"]))
        )
