"""Shared fixtures: tiny mlx-community-format checkpoints and their converted layouts, cached per session."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family="qwen3_5_moe", **opts) -> Path``: a cached tiny checkpoint (see make_checkpoint)."""
    from flashmoe.bench.checkpoints import make_checkpoint

    cache: dict[str, object] = {}

    def make(family: str = "qwen3_5_moe", **opts):
        key = json.dumps([family, opts], sort_keys=True)
        if key not in cache:
            path = tmp_path_factory.mktemp("ckpt")
            cache[key] = make_checkpoint(path / family, family, **opts)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def layout(tmp_path_factory, checkpoint):
    """``layout(family="qwen3_5_moe", alignment=16384, **opts) -> (checkpoint, layout)``, cached."""
    from flashmoe.convert import convert_checkpoint

    cache: dict[str, object] = {}

    def make(family: str = "qwen3_5_moe", alignment: int = 16384, **opts):
        key = json.dumps([family, alignment, opts], sort_keys=True)
        if key not in cache:
            src = checkpoint(family, **opts)
            out = tmp_path_factory.mktemp("layout") / family
            convert_checkpoint(src, out, alignment=alignment, progress=False)
            cache[key] = (src, out)
        return cache[key]

    return make
