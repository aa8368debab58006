"""Realistic routing for synthetic checkpoints (``flashmoe-bench synth --routing realistic``).

Random routers pick experts almost uniformly. Real ones are skewed (a few experts per layer take a
large share) with a long, nearly flat tail. This module builds router, embedding and norm weights so
that the stock mlx-lm model routes like that, deterministically from the seed:

- the first ``UNIT`` (64) hidden dimensions of every token embedding hold a constant ``AMPLITUDE`` (a
  direction all hidden states share), the next ``TOKEN_DIMS`` (512) hold ``AMPLITUDE`` x unit-variance
  noise drawn per token id (``zeta``). Both dwarf what attention and MLP blocks add to the residual
  stream (O(1) per dimension), so at every MoE layer they survive into the router's input;
- layer ``l``'s router reads the constant part through a per-expert weight that gives the logit a
  bias ``b_l[e]``: the popularity profile ``-a log(1 + rank / r0)`` floored at ``-floor``, ranks
  permuted per layer (each layer has its own popular experts), scaled per layer by
  ``exp(spread x N(0, 1))`` (layers differ in skew); it reads ``zeta`` through random weights
  normalized so that this part of the logit is N(0, 1) over tokens. Routing is top-k of
  ``b_l + N(0, 1)``; the profiles were fitted (``fit``) to the published per-layer LRU hit rates;
- the attention input norms and the final norm have weight 0 on these dimensions, so attention and
  the LM head see the model as before (scaled: RMSNorm divides by the larger norm).

What it does not model: routing is (nearly) a function of the current token id; temporal locality
beyond popularity comes only from repeated tokens (real models also have topic/context locality);
popularity does not drift within a text; cross-layer correlation is ~0 (as published).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

UNIT = 64  # constant dimensions (one quantization group; fewer when hidden < 1024)
TOKEN_DIMS = 512  # per-token noise dimensions (>= experts, so expert logits are ~independent)
AMPLITUDE = 64.0  # per-dimension size of both, vs O(1) for what the blocks add
ZETA_ROWS = 4096  # zeta is drawn in blocks of this many token ids (independent of chunking)


@dataclass(frozen=True)
class Profile:
    """Expert popularity: logit bias ``-a log(1 + rank / r0)`` floored at ``-floor``."""

    a: float
    r0: float
    floor: float
    spread: float  # per-layer skew factor exp(spread * N(0, 1))

    def bias(self, num_experts: int) -> np.ndarray:
        r = np.arange(num_experts, dtype=np.float64)
        return np.maximum(-self.a * np.log1p(r / self.r0), -self.floor)


# Fitted with ``fit`` to: 397B (512 experts, top-10) LRU 49/59/68/71 % at 16/32/64/128 slots;
# 35B (256, top-8) 80.8/82.7 % at 64/128. 122B has no published figures: the 397B profile.
PROFILES = {
    "qwen3.5-397b": Profile(2.5, 6.0, 4.0, 0.1),
    "qwen3.5-122b": Profile(2.5, 6.0, 4.0, 0.1),
    "qwen3.5-35b": Profile(6.0, 2.0, 10.0, 0.1),
}


class RoutingDesign:
    """The designed weights of one checkpoint: the first ``unit + token_dims`` (at most half of
    ``hidden``) dimensions of the residual stream carry the routing signal."""

    def __init__(self, profile: Profile, num_experts: int, hidden: int, seed: int):
        self.unit = min(UNIT, hidden // 16)
        self.token_dims = min(TOKEN_DIMS, hidden // 4)
        self.designed = self.unit + self.token_dims
        self.profile, self.num_experts, self.hidden, self.seed = profile, num_experts, hidden, seed
        # The router's logit scale: RMS of the designed part of the residual stream, so that the
        # logits are b + N(0, 1) as the fit assumed (and softmax scores are of that size).
        self.rms = AMPLITUDE * math.sqrt(self.designed / hidden)

    def _rng(self, *what: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, 0x5EED, *what])

    def layer_bias(self, layer: int) -> np.ndarray:
        """Logit bias per expert id of ``layer``."""
        rng = self._rng(1, layer)
        scale = math.exp(self.profile.spread * rng.standard_normal())
        return scale * self.profile.bias(self.num_experts)[rng.permutation(self.num_experts)]

    def zeta(self, start: int, rows: int) -> np.ndarray:
        """Unit-variance per-token noise of token ids ``start .. start + rows``."""
        out = []
        block = start // ZETA_ROWS
        while block * ZETA_ROWS < start + rows:
            z = self._rng(2, block).uniform(
                -math.sqrt(3), math.sqrt(3), (ZETA_ROWS, self.token_dims)
            )
            lo = max(start - block * ZETA_ROWS, 0)
            hi = min(start + rows - block * ZETA_ROWS, ZETA_ROWS)
            out.append(z[lo:hi])
            block += 1
        return np.concatenate(out).astype(np.float32)

    def router_block(self, layer: int) -> np.ndarray:
        """The router's weights on the designed dimensions: ``num_experts x DESIGNED``."""
        u = self.unit
        w = np.empty((self.num_experts, self.designed), dtype=np.float32)
        w[:, :u] = (self.layer_bias(layer) * self.rms / (u * AMPLITUDE))[:, None]
        g = self._rng(3, layer).uniform(-1.0, 1.0, (self.num_experts, self.token_dims))
        w[:, u:] = g * (self.rms / AMPLITUDE) * math.sqrt(3.0 / self.token_dims)
        return w

    def embedding_block(self, start: int, rows: int) -> np.ndarray:
        e = np.empty((rows, self.designed), dtype=np.float32)
        e[:, : self.unit] = AMPLITUDE
        e[:, self.unit :] = AMPLITUDE * self.zeta(start, rows)
        return e

    def adjust(self, module: str, start: int, w: mx.array) -> mx.array:
        """Put the designed columns into a float chunk of ``module``'s weight (rows from ``start``)."""
        if module.endswith(".embed_tokens"):
            block = self.embedding_block(start, w.shape[0])
        elif module.endswith(".mlp.gate"):
            block = self.router_block(_layer(module))
        else:
            return w
        return mx.concatenate([mx.array(block), w[:, self.designed :]], axis=1)

    def norm(self, name: str, value: mx.array) -> mx.array:
        """Input and final norms: weight 0 on the designed dimensions."""
        if name.endswith(".input_layernorm.weight") or name.endswith("model.norm.weight"):
            mask = np.ones(value.shape[0], dtype=np.float32)
            mask[: self.designed] = 0
            return (value * mx.array(mask)).astype(value.dtype)
        return value

    def route(
        self, layer: int, tokens: np.ndarray, top_k: int, x: np.ndarray | None = None
    ) -> np.ndarray:
        """The routing the design gives token ids ``tokens`` (without quantization and without
        what the blocks add to the residual stream): ``len(tokens) x top_k`` expert ids.
        ``x``: ``inputs(tokens)``, when routing the same tokens through several layers."""
        x = self.inputs(tokens) if x is None else x
        logits = x @ self.router_block(layer).T
        return np.argpartition(-logits, top_k - 1, axis=1)[:, :top_k]

    def inputs(self, tokens: np.ndarray) -> np.ndarray:
        """The designed dimensions of the embeddings of ``tokens``."""
        tokens = np.asarray(tokens, dtype=np.int64)
        x = np.empty((tokens.size, self.designed), dtype=np.float32)
        x[:, : self.unit] = AMPLITUDE
        for block in np.unique(tokens // ZETA_ROWS).tolist():
            sel = tokens // ZETA_ROWS == block
            x[sel, self.unit :] = (
                AMPLITUDE * self.zeta(block * ZETA_ROWS, ZETA_ROWS)[tokens[sel] % ZETA_ROWS]
            )
        return x


def design_routes(
    preset: str, layers: int, tokens: int, *, seed: int = 0, vocab: int = 248320
) -> tuple[list[np.ndarray], dict, int, int]:
    """The realistic design's routing of ``tokens`` decode steps of token ids drawn uniformly from
    ``vocab``, computed without running a model: per layer ``tokens x top_k`` expert ids, the
    trace meta, the number of experts and top-k."""
    from .synth import GEOMETRY

    hidden, _, _, experts, top_k, moe_i = GEOMETRY[preset][:6]
    design = RoutingDesign(PROFILES[preset], experts, hidden, seed)
    ids = np.random.default_rng([seed, 7]).integers(0, vocab, tokens)
    x = design.inputs(ids)
    routes = [design.route(layer, ids, top_k, x).astype(np.uint16) for layer in range(layers)]
    expert_bytes = 3 * moe_i * hidden // 2 + 3 * moe_i * (hidden // 64) * 4  # 4-bit, bf16 s/b
    meta = {"design": preset, "seed": seed, "vocab": vocab, "expert_bytes": expert_bytes}
    return routes, meta, experts, top_k


def design_trace(
    path,
    preset: str,
    layers: int,
    tokens: int,
    *,
    seed: int = 0,
    vocab: int = 248320,
) -> None:
    """Write a routing trace of the realistic design (``design_routes``); hits are not recorded
    (all False). The model itself routes ~95 % the same (quantization, the blocks)."""
    from ..runtime.trace import TraceWriter

    routes, meta, experts, top_k = design_routes(preset, layers, tokens, seed=seed, vocab=vocab)
    miss = np.zeros((1, top_k), dtype=bool)
    with TraceWriter(path, num_layers=layers, num_experts=experts, top_k=top_k, meta=meta) as w:
        for t in range(tokens):
            for layer in range(layers):
                w.record(layer, routes[layer][t : t + 1], miss)


def _layer(module: str) -> int:
    parts = module.split(".")
    return int(parts[parts.index("layers") + 1])


def lru_hit_rate(routes: np.ndarray, slots: int) -> float:
    """Hit rate of a per-layer LRU bank of ``slots`` over one token per step (the runtime's rule)."""
    bank: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for row in routes.tolist():
        hits += sum(e in bank for e in row)
        for e in row:
            bank[e] = None
            bank.move_to_end(e)
        while len(bank) > slots:
            bank.popitem(last=False)
    return hits / routes.size


def fit(
    num_experts: int, top_k: int, targets: dict[int, float], tokens: int = 1000, seed: int = 0
) -> list[tuple[float, Profile, list[float]]]:
    """Grid search of the profile against LRU hit-rate ``targets`` ({slots: %}); best first."""
    rng = np.random.default_rng(seed)
    out = []
    for a in (1.5, 2.0, 2.5, 3.0, 4.0, 6.0):
        for r0 in (1.0, 2.0, 4.0, 6.0, 16.0):
            for floor in (3.0, 4.0, 5.0, 6.0, 8.0, 10.0):
                p = Profile(a, r0, floor, 0.0)
                x = p.bias(num_experts) + rng.standard_normal((tokens, num_experts))
                routes = np.argpartition(-x, top_k - 1, axis=1)[:, :top_k]
                got = [100 * lru_hit_rate(routes, s) for s in targets]
                err = max(abs(g - t) for g, t in zip(got, targets.values(), strict=True))
                out.append((err, p, got))
    return sorted(out, key=lambda r: r[0])
