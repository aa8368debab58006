"""Routing traces: round trip, steps, size, and errors."""

from __future__ import annotations

import numpy as np
import pytest
from flashmoe.runtime import trace as trace_mod
from flashmoe.runtime.trace import TraceError, TraceWriter, read_trace


def _routes(rng, rows: int, experts: int, k: int) -> np.ndarray:
    return np.argsort(rng.random((rows, experts)), axis=1)[:, :k]


def test_round_trip_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(trace_mod, "CHUNK_IDS", 64)  # many chunks
    rng = np.random.default_rng(1)
    path = tmp_path / "t.fmt"
    calls = []
    with TraceWriter(path, num_layers=3, num_experts=300, top_k=4, meta={"model": "x"}) as w:
        for step in range(20):
            rows = 5 if step == 0 else 1  # a prefill chunk, then decode
            for layer in (0, 2):
                ids = _routes(rng, rows, 300, 4)
                hit = rng.random(ids.shape) < 0.5
                w.record(layer, ids, hit)
                calls.append((layer, step, ids, hit))
    t = read_trace(path)
    assert (t.num_layers, t.num_experts, t.top_k, t.meta) == (3, 300, 4, {"model": "x"})
    assert sorted(t.layers) == [0, 2] and t.steps == 20
    for layer in (0, 2):
        mine = [c for c in calls if c[0] == layer]
        ids = np.concatenate([c[2] for c in mine])
        hit = np.concatenate([c[3] for c in mine])
        steps = np.concatenate([np.full(len(c[2]), c[1]) for c in mine])
        lt = t.layers[layer]
        order = np.argsort(ids, axis=1, kind="stable")
        assert lt.experts.dtype == np.uint16
        np.testing.assert_array_equal(lt.experts, np.take_along_axis(ids, order, axis=1))
        np.testing.assert_array_equal(lt.hit, np.take_along_axis(hit, order, axis=1))
        np.testing.assert_array_equal(lt.step, steps)


def test_end_step_and_repeated_layer(tmp_path):
    path = tmp_path / "t.fmt"
    w = TraceWriter(path, num_layers=1, num_experts=8, top_k=2, meta={})
    one = np.array([[1, 2]])
    w.record(0, one, one > 0)
    w.record(0, one, one > 0)  # same layer again: a new step (one call per layer and step)
    w.end_step()
    w.end_step()  # no empty steps
    w.record(0, one, one > 0)
    w.close()
    w.close()
    assert read_trace(path).layers[0].step.tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        w.record(0, one, one > 0)


def test_wrong_k_and_bad_files(tmp_path):
    w = TraceWriter(tmp_path / "t.fmt", num_layers=1, num_experts=8, top_k=2, meta={})
    with pytest.raises(ValueError):
        w.record(0, np.array([[1, 2, 3]]), np.zeros((1, 3), bool))
    w.record(0, np.array([[1, 2]]), np.zeros((1, 2), bool))
    w.close()
    data = (tmp_path / "t.fmt").read_bytes()
    (tmp_path / "cut.fmt").write_bytes(data[:-3])
    (tmp_path / "junk.fmt").write_bytes(b"hello world, not a trace")
    for name in ("cut.fmt", "junk.fmt"):
        with pytest.raises(TraceError):
            read_trace(tmp_path / name)


def test_size_of_a_long_skewed_trace(tmp_path):
    """Bytes per token and layer for top-10 of 512 with a skewed (Zipf-like) popularity."""
    rng = np.random.default_rng(0)
    rows, experts, k = 20000, 512, 10
    bias = -1.5 * np.log1p(np.arange(experts))
    ids = np.argpartition(-(bias + rng.standard_normal((rows, experts))), k - 1, axis=1)[:, :k]
    hit = np.zeros(ids.shape, bool)
    path = tmp_path / "t.fmt"
    with TraceWriter(path, num_layers=1, num_experts=experts, top_k=k, meta={}) as w:
        for r in range(rows):
            w.record(0, ids[r : r + 1], hit[r : r + 1])
    per_row = path.stat().st_size / rows
    assert per_row < 6.0, per_row  # vs 20 B raw; 100k tokens x 60 layers: < 36 MB
    assert read_trace(path).layers[0].experts.shape == (rows, k)


def test_load_attaches_a_trace_writer(layout, tmp_path):
    from flashmoe.runtime import load

    _, root = layout()
    model, _ = load(str(root))
    assert model.flashmoe.store.trace is None
    model.flashmoe.close()
    path = tmp_path / "run.fmt"
    model, _ = load(str(root), trace=path)
    writer = model.flashmoe.store.trace
    assert isinstance(writer, TraceWriter) and writer.top_k == model.flashmoe.top_k
    writer.record(0, np.arange(writer.top_k)[None], np.zeros((1, writer.top_k), bool))
    model.flashmoe.close()
    t = read_trace(path)
    assert t.meta["slots"] == model.flashmoe.slots and t.layers[0].experts.shape[0] == 1


def test_run_trace_flag_writes_a_readable_trace(layout, tmp_path, capsys):
    from flashmoe.runtime import cli

    _, root = layout()
    path = tmp_path / "run.fmt"
    argv = [str(root), "--max-tokens", "3", "--bank-experts", "4", "--trace", str(path)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    t = read_trace(path)
    assert t.meta["slots"] == 4 and t.num_experts >= 4
    # every MoE layer recorded every step: the prompt's rows, then one row per decode step
    assert len(t.layers) == t.num_layers
    for lt in t.layers.values():
        assert lt.experts.shape[1] == t.top_k and len(set(lt.step.tolist())) >= 3
        assert lt.hit.dtype == bool and lt.hit.any() and not lt.hit.all()
