"""Pipeline stages: which contiguous decoder layers each rank runs, balanced by bytes.

mlx-lm splits a model with ``model.model.pipeline(group, split)`` (``mlx_lm/models/pipeline.py``):
``split[r]`` layers go to rank ``r``, the *last* layers to rank 0 and the first to the highest
rank; activations pass from rank r+1 to rank r (``send``/``recv``) and the final hidden state is
all-gathered, so every rank computes the same logits. This module only chooses ``split``: a
layer weighs its dense bytes (from the dense file's header) plus its experts' bytes, and the
contiguous partition with the lightest heaviest stage wins.
"""

from __future__ import annotations

import inspect
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from ..layouts import Index, LayoutError, text_config

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Stage:
    """What one rank runs: decoder layers ``start <= layer < stop`` and its MoE layers."""

    rank: int
    start: int
    stop: int
    moe_layers: tuple[int, ...]
    dense_bytes: int  # its layers' dense tensors (the shared ones not included)
    expert_bytes: int  # every expert of its MoE layers


@dataclass(frozen=True)
class Plan:
    """The stages by rank, and the dense bytes every rank holds (embeddings, norm, head)."""

    stages: tuple[Stage, ...]
    shared_bytes: int

    @property
    def split(self) -> list[int]:
        """mlx-lm's ``split`` argument: layers per rank."""
        return [s.stop - s.start for s in self.stages]

    def describe(self) -> str:
        parts = [
            f"rank {s.rank}: layers {s.start}-{s.stop - 1} ({_size(s.dense_bytes + s.expert_bytes)})"
            for s in self.stages
        ]
        return f"pipeline over {len(self.stages)} ranks, " + ", ".join(parts)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def dense_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {
        name: info["data_offsets"][1] - info["data_offsets"][0]
        for name, info in header.items()
        if name != "__metadata__"
    }


def balanced_ranges(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Split ``weights`` into ``parts`` non-empty contiguous ranges minimizing the largest sum."""
    n = len(weights)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} layers into {parts} stages")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # best[j][i]: the lightest heaviest stage over the first i layers in j stages; cut: its start
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for j in range(1, parts + 1):
        for i in range(j, n - (parts - j) + 1):
            for k in range(j - 1, i):
                cost = max(best[j - 1][k], prefix[i] - prefix[k])
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, k
    ranges, i = [], n
    for j in range(parts, 0, -1):
        ranges.append((cut[j][i], i))
        i = cut[j][i]
    return ranges[::-1]


def plan_stages(root: Path, index: Index, ranks: int) -> Plan:
    """Stages for ``ranks`` ranks (rank 0 runs the last layers, as mlx-lm's pipeline does)."""
    moe = sorted(entry.layer for entry in index.layers)
    if ranks > len(moe):
        raise ValueError(
            f"{ranks} ranks but the model has {len(moe)} MoE layers: use at most {len(moe)} ranks"
        )
    layers = text_config(index.config).get("num_hidden_layers")
    if not isinstance(layers, int) or layers <= max(moe):
        raise LayoutError(f"{root}: config's num_hidden_layers does not cover the MoE layers")
    dense, shared = [0] * layers, 0
    for name, nbytes in dense_tensor_bytes(root / index.dense.name).items():
        m = _LAYER_KEY.search(name)
        if m and "mtp." not in name and int(m.group(1)) < layers:
            dense[int(m.group(1))] += nbytes
        else:
            shared += nbytes
    experts = {layer: index.num_experts * index.expert_bytes for layer in moe}
    weights = [dense[i] + experts.get(i, 0) for i in range(layers)]
    by_order = balanced_ranges(weights, ranks)  # first layers first: the highest rank's
    stages = []
    for rank in range(ranks):
        start, stop = by_order[ranks - 1 - rank]
        own = tuple(layer for layer in moe if start <= layer < stop)
        stages.append(
            Stage(
                rank,
                start,
                stop,
                own,
                sum(dense[start:stop]),
                sum(experts[layer] for layer in own),
            )
        )
    return Plan(tuple(stages), shared)


def split_model(model: nn.Module, group, plan: Plan) -> None:
    """mlx-lm's ``pipeline(group, split)`` on ``model.model``; refuses a family without it."""
    inner = getattr(model, "model", None)
    pipeline = getattr(inner, "pipeline", None)
    if pipeline is None:
        raise LayoutError(
            f"mlx-lm's {type(model).__module__.rsplit('.', 1)[-1]} model has no pipeline "
            "support: it cannot be split across ranks"
        )
    if "split" not in inspect.signature(pipeline).parameters:
        raise RuntimeError("this mlx-lm's pipeline() takes no split: upgrade mlx-lm (>= 0.32)")
    pipeline(group, split=plan.split)
    stage = plan.stages[group.rank()]
    if (inner.start_idx, inner.end_idx) != (stage.start, stage.stop):
        raise RuntimeError(
            f"mlx-lm placed layers {inner.start_idx}-{inner.end_idx - 1} on rank "
            f"{stage.rank}, the plan {stage.start}-{stage.stop - 1}"
        )
