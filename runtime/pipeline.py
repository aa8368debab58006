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
import resource
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..layouts import Index, LayoutError, text_config
from ..layouts.families import layer_of_module_path


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
            f"{ranks} ranks for {len(moe)} MoE layers: every rank needs one (use at most {len(moe)})"
        )
    layers = text_config(index.config).get("num_hidden_layers")
    if not isinstance(layers, int) or layers <= max(moe):
        raise LayoutError(f"{root}: config's num_hidden_layers does not cover the MoE layers")
    dense, shared = [0] * layers, 0
    for name, nbytes in dense_tensor_bytes(root / index.dense.name).items():
        layer = layer_of_module_path(name)
        if layer is not None and "mtp." not in name and layer < layers:
            dense[layer] += nbytes
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


def transfer_seconds(model: nn.Module, group, rounds: int = 20) -> float:
    """Seconds per decode token spent moving activations, measured alone: the pipeline's own
    pattern (a ``[1, 1, hidden]`` hidden state from each rank to the next, then the
    all-gather that hands the last one to every rank), without any layer in between."""
    from .group import settle

    rank, size = group.rank(), group.size()
    embed = getattr(model.model, "embed_tokens", None)
    if embed is not None:  # one token's hidden state, in its dtype
        x = embed(mx.array([[0]]))
    else:
        x = mx.zeros((1, 1, text_config(rt_config(model))["hidden_size"]), dtype=mx.float16)

    def once() -> None:
        h = x
        if rank < size - 1:
            h = mx.distributed.recv_like(h, rank + 1, group=group)
        if rank > 0:
            h = mx.distributed.send(h, rank - 1, group=group)
        mx.eval(mx.distributed.all_gather(h, group=group)[: h.shape[0]])

    settle()
    once()  # the first use sets up buffers
    t0 = time.perf_counter()
    for _ in range(rounds):
        once()
    return (time.perf_counter() - t0) / rounds


def rt_config(model: nn.Module) -> dict:
    return model.flashmoe.index.config


def peak_rss_bytes() -> int:
    """This process's peak resident set size."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def rank_lines(rt, n: int, first: tuple, transfer: float | None) -> list[str]:
    """Every rank's figures since the first token, gathered to rank 0 as ``--timing`` lines
    (the same call on every rank; only rank 0's return value is printed)."""
    from .group import gather_rows

    stats, timing = rt.store.stats, rt.timing
    _, m0, h0, b0, io0, t0, *_ = first
    stage = rt.plan.stages[rt.rank]
    phases = [0.0, 0.0, 0.0]
    if timing is not None and t0 is not None:
        now = (timing.dense, timing.router, timing.compute)
        phases = [a - b for a, b in zip(now, t0, strict=True)]
    row = [
        stage.start,
        stage.stop - 1,
        rt.slots,
        stats.hits - h0,
        stats.misses - m0,
        (stats.bytes_read - b0) / 1e6,
        (stats.io_seconds - io0) * 1000,
        *(p * 1000 for p in phases),
        peak_rss_bytes() / 1e6,
    ]
    rows = gather_rows(rt.group, row, "collecting the per-rank figures")
    per = max(1, n)
    lines = []
    for r, (a, b, slots, hit, miss, mb, io_ms, dense, router, compute, rss) in enumerate(rows):
        rate = hit / (hit + miss) * 100 if hit + miss else 0.0
        line = (
            f"rank {r}: layers {a:.0f}-{b:.0f}, bank {slots:.0f} experts/layer, per decode "
            f"token: hit rate {rate:.1f}%, {mb / per:.2f} MB read, expert I/O {io_ms / per:.2f} "
            f"ms exposed"
        )
        if timing is not None:
            line += (
                f", expert compute {compute / per:.2f} ms, router sync {router / per:.2f} ms, "
                f"dense + waiting for the previous rank {dense / per:.2f} ms"
            )
        lines.append(f"{line}; peak RSS {rss:.0f} MB")
    if transfer is not None:
        lines.append(
            f"transfers: {transfer * 1000:.3f} ms per token (the hidden state through "
            f"{len(rows)} ranks and back, measured alone at warm-up)"
        )
    return lines
