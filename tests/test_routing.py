"""Realistic routing in synthetic checkpoints: stock mlx-lm routes with the published skew."""

from __future__ import annotations

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from flashmoe.bench.routing import PROFILES, RoutingDesign, lru_hit_rate
from flashmoe.bench.synth import small_config, synthesize
from mlx_lm.models import switch_layers

VOCAB = 2048


def _tiny_35b_config(layers: int = 1) -> dict:
    """The 35B routing geometry (256 experts, top-8) with a small hidden size and tiny experts."""
    return small_config("qwen3.5-35b", layers, VOCAB, expert_intermediate=32)


def _routes(path, tokens: np.ndarray, monkeypatch) -> list[np.ndarray]:
    """Per MoE layer, the experts stock mlx-lm routes each token of one forward pass to."""
    model, _ = mlx_lm.load(str(path))
    routes: list[np.ndarray] = []
    call = switch_layers.SwitchGLU.__call__

    def record(self, x, indices):
        routes.append(np.array(indices).reshape(-1, indices.shape[-1]))
        return call(self, x, indices)

    monkeypatch.setattr(switch_layers.SwitchGLU, "__call__", record)
    logits = model(mx.array(tokens[None]))
    assert bool(mx.all(mx.isfinite(logits)).item())
    return routes


@pytest.mark.parametrize("routing", ["realistic", "uniform"])
def test_routing_statistics(tmp_path, monkeypatch, routing):
    config = _tiny_35b_config()
    out = synthesize(
        tmp_path / routing,
        "qwen3.5-35b",
        1,
        routing=routing,
        config=config,
        dtype="float32",
        progress=False,
    )
    tokens = np.random.default_rng(3).integers(0, VOCAB, 600)
    (routes,) = _routes(out, tokens, monkeypatch)
    assert routes.shape == (tokens.size, 8)
    hits = [100 * lru_hit_rate(routes, slots) for slots in (64, 128)]
    if routing == "uniform":  # near X % for a bank of X % (25 / 50 %), far below the published
        assert hits[0] < 45 and hits[1] < 70, hits
        return
    for got, published in zip(hits, (80.8, 82.7), strict=True):  # anemll-flash-mlx, 35B-A3B
        assert abs(got - published) <= 6, hits
    # The model routes as the design says (quantization and the blocks' additions aside).
    design = RoutingDesign(PROFILES["qwen3.5-35b"], 256, 1024, seed=0)
    ideal = design.route(0, tokens, 8)
    pairs = zip(ideal.tolist(), routes.tolist(), strict=True)
    same = np.mean([len(set(a) & set(b)) for a, b in pairs])
    assert same / 8 > 0.9


def test_design_is_deterministic_and_popularity_differs_per_layer():
    a = RoutingDesign(PROFILES["qwen3.5-397b"], 512, 4096, seed=0)
    b = RoutingDesign(PROFILES["qwen3.5-397b"], 512, 4096, seed=0)
    np.testing.assert_array_equal(a.router_block(3), b.router_block(3))
    np.testing.assert_array_equal(a.zeta(4000, 200), b.zeta(4000, 200))
    np.testing.assert_array_equal(a.zeta(4000, 200)[100:], a.zeta(4100, 100))
    top = [set(np.argsort(-a.layer_bias(layer))[:16].tolist()) for layer in range(4)]
    assert all(len(top[0] & t) < 8 for t in top[1:])
