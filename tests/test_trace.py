"""Routing traces: round trip, steps, size, format versions, and errors."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
import time

import numpy as np
import pytest
import zstandard
from flashmoe.runtime import trace as trace_mod
from flashmoe.runtime.trace import RECORD, TraceError, TraceWriteError, TraceWriter, read_trace


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
    assert per_row < 4.5, per_row  # vs 20 B raw (version 1: 5.4 B); 100k x 60 layers: < 27 MB
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


def _sticky(rng, rows: int, experts: int, k: int, keep: float, skew: float) -> np.ndarray:
    """Routes where each id of the previous row stays with probability ``keep`` (locality),
    the rest top-k of a popularity bias ``-skew log(1 + expert)`` plus noise."""
    bias = -skew * np.log1p(np.arange(experts))
    out = np.empty((rows, k), np.int64)
    prev = None
    for r in range(rows):
        score = bias + rng.standard_normal(experts)
        if prev is not None:
            score[prev[rng.random(k) < keep]] = np.inf
        out[r] = prev = np.argpartition(-score, k - 1)[:k]
    return out


def _layer_modes(sections: list[bytes], nlayers: int) -> list[int]:
    """The per-layer modes of a version 2 chunk (its table: u8 mode, u8 h, h x u16 head)."""
    table, pos, modes = sections[4], 0, []
    for _ in range(nlayers):
        mode, h = struct.unpack_from("<BB", table, pos)
        modes.append(mode)
        pos += 2 + 2 * h
    assert pos == len(table)
    return modes


def test_version2_round_trip_locality_head_and_prefill(tmp_path, monkeypatch):
    """Layer 0 has locality (its chunks use keep masks), layer 1 skew (a head bitmap), layer 3
    uniform routing; a multi-token first call, hits, zero-row calls, many chunks, read in
    batches."""
    rng = np.random.default_rng(2)
    steps, experts, k = 400, 64, 4
    routes = {
        0: _sticky(rng, steps + 5, experts, k, 0.8, 0.0),
        1: _sticky(rng, steps + 5, experts, k, 0.0, 2.0),
        3: _sticky(rng, steps + 5, experts, k, 0.0, 0.0),
    }
    hits = {layer: rng.random(r.shape) < 0.6 for layer, r in routes.items()}
    monkeypatch.setattr(trace_mod, "CHUNK_IDS", 1200)  # ~4 chunks
    monkeypatch.setattr(trace_mod, "BATCH", 3)  # read in batches of 3 chunks
    path = tmp_path / "t.fmt"
    with TraceWriter(path, num_layers=4, num_experts=experts, top_k=k, meta={}) as w:
        for step in range(steps):
            part = slice(0, 6) if step == 0 else slice(step + 5, step + 6)  # prefill, then decode
            for layer in range(4):
                if layer == 2:  # a zero-row call
                    w.record(2, np.zeros((0, k), np.int64), np.zeros((0, k), bool))
                    continue
                w.record(layer, routes[layer][part], hits[layer][part])
    t = read_trace(path)
    assert sorted(t.layers) == [0, 1, 3] and t.steps == steps
    for layer, r in routes.items():
        rows = np.concatenate([r[:6], r[6 : steps + 5]])
        hit = np.concatenate([hits[layer][:6], hits[layer][6 : steps + 5]])
        order = np.argsort(rows, axis=1, kind="stable")
        lt = t.layers[layer]
        np.testing.assert_array_equal(lt.experts, np.take_along_axis(rows, order, axis=1))
        np.testing.assert_array_equal(lt.hit, np.take_along_axis(hit, order, axis=1))
        np.testing.assert_array_equal(lt.step, [0] * 6 + list(range(1, steps)))
    records = np.array([(layer, k, 1, s) for s in range(300) for layer in (0, 1, 3)], RECORD)
    ids = np.stack([routes[layer][s] for s in range(300) for layer in (0, 1, 3)])
    sections = trace_mod._encode(records, ids, np.zeros(ids.shape, bool), experts)
    assert _layer_modes(sections, 3) == [1, 0, 0]  # locality only where it pays


def _chunk_v2(sections: list[bytes], level: int = 3) -> bytes:
    frames = [zstandard.ZstdCompressor(level=level).compress(s) for s in sections]
    body = struct.pack(f"<H{len(frames)}I", len(frames), *map(len, frames)) + b"".join(frames)
    return struct.pack("<I", len(body)) + body


def test_empty_chunks_and_sizes_of_locality_and_uniform(tmp_path):
    rng = np.random.default_rng(3)
    rows, experts, k = 4000, 512, 10
    path = tmp_path / "t.fmt"
    sizes = {}
    for name, keep in (("loc", 0.3), ("uniform", 0.0)):
        ids = _sticky(rng, rows, experts, k, keep, 0.0)
        with TraceWriter(path, num_layers=1, num_experts=experts, top_k=k, meta={}) as w:
            w.record(0, ids, np.zeros(ids.shape, bool))  # one call of many rows
        sizes[name] = path.stat().st_size / rows
        np.testing.assert_array_equal(read_trace(path).layers[0].experts, np.sort(ids, axis=1))
    # log2 C(512, 10) = 68.0 bits = 8.5 B per row; 30 % kept from the previous row: ~7.3 B
    assert sizes["uniform"] < 9.0 and sizes["loc"] < 7.9, sizes
    empty = trace_mod._encode(
        np.zeros(0, RECORD), np.zeros((0, k), np.uint16), np.zeros((0, k), bool), experts
    )
    only_zero_rows = trace_mod._encode(
        np.array([(0, k, 0, 0)], RECORD),
        np.zeros((0, k), np.uint16),
        np.zeros((0, k), bool),
        experts,
    )
    with open(path, "ab") as f:
        f.write(_chunk_v2(empty) + _chunk_v2(only_zero_rows))
    assert read_trace(path).layers[0].experts.shape == (rows, k)


def test_version1_trace_still_reads(tmp_path):
    """A version 1 file, written here by the letter of layouts/FORMAT.md."""
    ids = np.array([[5, 1, 9], [2, 3, 4], [7, 0, 6]], np.uint16)  # layer 0, 1, then 0 again
    hit = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0]], bool)
    records = np.array([(0, 3, 1, 0), (1, 3, 1, 0), (0, 3, 1, 1)], RECORD)
    order = np.argsort(ids, axis=1)
    srt = np.take_along_axis(ids, order, axis=1)
    delta = srt.copy()
    delta[:, 1:] = np.diff(srt, axis=1)
    raw = struct.pack("<I", 3) + records.tobytes()
    raw += delta.astype("<u2").view(np.uint8).reshape(-1, 2).T.tobytes()
    raw += np.packbits(np.take_along_axis(hit, order, axis=1).ravel(), bitorder="little").tobytes()
    frame = zstandard.ZstdCompressor().compress(raw)
    header = {"format": "flashmoe-trace", "version": 1, "num_layers": 2, "num_experts": 10}
    blob = json.dumps({**header, "top_k": 3, "meta": {}}).encode()
    path = tmp_path / "v1.fmt"
    path.write_bytes(
        b"FMOETRC1" + struct.pack("<I", len(blob)) + blob + struct.pack("<I", len(frame)) + frame
    )
    t = read_trace(path)
    assert t.layers[0].experts.tolist() == [[1, 5, 9], [0, 6, 7]]
    assert t.layers[0].hit.tolist() == [[0, 1, 0], [1, 0, 1]] and t.layers[0].step.tolist() == [
        0,
        1,
    ]
    assert t.layers[1].experts.tolist() == [[2, 3, 4]] and t.layers[1].hit.tolist() == [[0, 1, 1]]
    blob = json.dumps({**header, "version": 3, "top_k": 3, "meta": {}}).encode()
    (tmp_path / "v3.fmt").write_bytes(b"FMOETRC1" + struct.pack("<I", len(blob)) + blob)
    with pytest.raises(TraceError, match=r"v3\.fmt: unsupported trace version 3") as e:
        read_trace(tmp_path / "v3.fmt")
    assert "\n" not in str(e.value)


def _maps(payload: bytes, at: int, widths: dict[int, int]) -> tuple[dict[int, int], int]:
    """A B-bit map section (FORMAT.md): {row: bits as an int} for rows of width ``widths[row]``."""
    maps = dict.fromkeys(widths, 0)
    for c in range((max(widths.values(), default=0) + 7) // 8):
        for r in [r for r, width in widths.items() if width > 8 * c]:
            maps[r] |= payload[at] << (8 * c)
            at += 1
    return maps, at


def _read_by_the_letter(path) -> tuple[dict, set]:
    """A second reader of version 2, written from layouts/FORMAT.md in plain Python: per layer,
    its rows as (ids ascending, hits, step); and the layer modes seen."""
    data = path.read_bytes()
    (hlen,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12 : 12 + hlen])
    e, k, pos, out, modes = header["num_experts"], header["top_k"], 12 + hlen, {}, set()
    while pos < len(data):
        (blen,) = struct.unpack_from("<I", data, pos)
        (m,) = struct.unpack_from("<H", data, pos + 4)
        sizes = struct.unpack_from(f"<{m}I", data, pos + 6)
        at, payload = pos + 6 + 4 * m, b""
        for size in sizes:
            payload += zstandard.ZstdDecompressor().decompress(data[at : at + size])
            at += size
        pos += 4 + blen
        (n,) = struct.unpack_from("<I", payload, 0)
        layer = struct.unpack_from(f"<{n}H", payload, 4)
        nrows = struct.unpack_from(f"<{n}I", payload, 4 + 2 * n)
        delta = struct.unpack_from(f"<{n}I", payload, 4 + 6 * n)
        step = [sum(delta[: i + 1]) for i in range(n)]
        rows = [
            (lay, s)
            for lay in sorted(set(layer))
            for i, (lay2, s) in enumerate(zip(layer, step, strict=True))
            if lay2 == lay
            for _ in range(nrows[i])
        ]
        at, table = 4 + 10 * n, {}
        for lay in sorted({lay for lay, _ in rows}):
            mode, h = payload[at], payload[at + 1]
            head = list(struct.unpack_from(f"<{h}H", payload, at + 2))
            table[lay] = (mode, h, head + [i for i in range(e) if i not in head])  # rank -> id
            at += 2 + 2 * h

        loc = {r: k for r, (lay, _) in enumerate(rows) if table[lay][0] == 1}
        keep, at = _maps(payload, at, loc)
        new, at = _maps(payload, at, {r: table[lay][1] for r, (lay, _) in enumerate(rows)})
        modes |= {mode for mode, _, _ in table.values()}
        tails = [
            k - bin(keep.get(r, 0)).count("1") - bin(new[r]).count("1") for r in range(len(rows))
        ]
        gaps = {r: [] for r in range(len(rows))}
        for j in range(k):
            for r in range(len(rows)):
                if tails[r] > j:
                    g = 0
                    while payload[at] == 255:
                        g, at = g + 255, at + 1
                    gaps[r].append(g + payload[at])
                    at += 1
        hits, at = _maps(payload, at, dict.fromkeys(range(len(rows)), k))
        assert at == len(payload)
        prev: dict[int, list[int]] = {}
        for r, (lay, s) in enumerate(rows):
            mode, h, rank_to_id = table[lay]
            ranks = [x for j, x in enumerate(prev.get(lay, [])) if keep.get(r, 0) >> j & 1]
            ranks += [i for i in range(h) if new[r] >> i & 1]
            v = -1
            for g in gaps[r]:
                v += g + 1
                ranks.append(h + v)
            ranks = prev[lay] = sorted(ranks)
            pairs = sorted((rank_to_id[x], bool(hits[r] >> j & 1)) for j, x in enumerate(ranks))
            out.setdefault(lay, []).append(([i for i, _ in pairs], [b for _, b in pairs], s))
    return out, modes


def test_format_md_describes_version2(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    monkeypatch.setattr(trace_mod, "CHUNK_IDS", 300)
    path = tmp_path / "t.fmt"
    routes = {0: _sticky(rng, 120, 40, 3, 0.9, 0.0), 1: _sticky(rng, 120, 40, 3, 0.0, 3.0)}
    with TraceWriter(path, num_layers=2, num_experts=40, top_k=3, meta={}) as w:
        for s in range(100):
            part = slice(0, 21) if s == 0 else slice(s + 20, s + 21)
            for layer, r in routes.items():
                w.record(layer, r[part], rng.random(r[part].shape) < 0.5)
    t, (mine, modes) = read_trace(path), _read_by_the_letter(path)
    assert modes == {0, 1}
    for layer, lt in t.layers.items():
        assert [r[0] for r in mine[layer]] == lt.experts.tolist()
        assert [r[1] for r in mine[layer]] == lt.hit.tolist()
        assert [r[2] for r in mine[layer]] == lt.step.tolist()


def test_tracesize_bounds_and_locality():
    """bench.tracesize's entropy bounds: uniform top-4 of 64 carries log2 C(64, 4) bits; a kept
    share of 0.5 shows only in the bound given the previous token."""
    import math

    from flashmoe.bench.tracesize import entropy_bounds, sticky_routes

    rng = np.random.default_rng(6)
    uniform, sticky = (sticky_routes(rng, 8000, 64, 4, keep, 1)[0] for keep in (0.0, 0.5))
    marginal, count, previous = entropy_bounds(uniform, 64)
    assert abs(count - math.log2(math.comb(64, 4))) < 0.3 and previous <= count < marginal
    shared = np.mean([len(set(a) & set(b)) for a, b in zip(sticky[1:], sticky[:-1], strict=True)])
    assert 0.45 < shared / 4 < 0.6
    _, count, previous = entropy_bounds(sticky, 64)
    assert previous < count - 4  # keep masks: ~4 x H(0.5) bits instead of ~2 ids of 64


def _fifo(tmp_path, name: str, size: int = 4096) -> tuple:
    """A named pipe of ``size`` bytes with its read end open (so that a writer can open it)."""
    path = tmp_path / name
    os.mkfifo(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    return path, fd


def test_writer_thread_bounds_pending_chunks_and_writes_the_synchronous_bytes(
    tmp_path, monkeypatch
):
    """A pipe nobody reads stalls the writer thread in its first chunk: one more chunk waits,
    and the record that hands over a third blocks. Drained, the bytes are those of encoding
    each chunk's records synchronously."""
    monkeypatch.setattr(trace_mod, "CHUNK_IDS", 20_000)  # a chunk every 2,000 one-row records
    rng = np.random.default_rng(7)
    n, e, k = 7000, 512, 10
    ids = np.argpartition(rng.random((n, e)), k, axis=1)[:, :k]
    hits = rng.random((n, k)) < 0.5
    path, fd = _fifo(tmp_path, "t.fifo")
    w = TraceWriter(path, num_layers=2, num_experts=e, top_k=k, meta={"m": 1})
    os.set_blocking(fd, True)
    done: list[int] = []

    def produce() -> None:
        for r in range(n):
            w.record(r % 2, ids[r : r + 1], hits[r : r + 1])
            done.append(r)

    def drain() -> None:
        while part := os.read(fd, 1 << 16):
            data.extend(part)

    data = bytearray()
    producer = threading.Thread(target=produce, daemon=True)  # daemons: a failure cannot hang
    producer.start()
    deadline = time.monotonic() + 30
    while len(done) < 5999 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert len(done) == 5999 and producer.is_alive()  # chunk 1 writing, 2 waiting, 3 blocked
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    producer.join(30)
    w.close()
    reader.join(30)
    os.close(fd)
    header = {"format": "flashmoe-trace", "version": 2, "num_layers": 2, "num_experts": e}
    blob = json.dumps({**header, "top_k": k, "meta": {"m": 1}}, sort_keys=True).encode()
    expected = trace_mod.MAGIC + struct.pack("<I", len(blob)) + blob
    records = np.array([(r % 2, k, 1, r // 2) for r in range(n)], RECORD)
    for part in (slice(0, 2000), slice(2000, 4000), slice(4000, 6000), slice(6000, n)):
        sections = trace_mod._encode(records[part], ids[part], hits[part], e)
        expected += _chunk_v2(sections, trace_mod.LEVEL)
    assert bytes(data) == expected
    (tmp_path / "t.fmt").write_bytes(data)
    t = read_trace(tmp_path / "t.fmt")
    order = np.argsort(ids[1::2], axis=1)
    np.testing.assert_array_equal(t.layers[1].experts, np.take_along_axis(ids[1::2], order, 1))
    np.testing.assert_array_equal(t.layers[1].hit, np.take_along_axis(hits[1::2], order, 1))


def test_a_failed_chunk_write_is_raised_once_in_one_line(tmp_path, monkeypatch):
    """The pipe's reader is gone, so the writer thread's write fails (EPIPE): the next flush
    raises (and every later record), or else close does; the file is closed either way."""
    monkeypatch.setattr(trace_mod, "CHUNK_IDS", 40)
    one = np.arange(4)[None]
    for ending in ("flush", "close"):
        path, fd = _fifo(tmp_path, f"{ending}.fifo")
        w = TraceWriter(path, num_layers=1, num_experts=8, top_k=4, meta={})
        os.close(fd)
        for _ in range(12):  # a chunk of 10 rows handed over, 2 rows buffered
            w.record(0, one, one > 1)
        if ending == "flush":
            with pytest.raises(TraceWriteError) as err:
                w.flush()
            with pytest.raises(TraceWriteError):
                w.record(0, one, one > 1)
            w.close()  # already raised: closes quietly
        else:
            with pytest.raises(TraceWriteError) as err:
                w.close()
        msg = str(err.value)
        assert msg.startswith(f"{path}: writing the routing trace failed (BrokenPipeError")
        assert "first 0 rows" in msg and "\n" not in msg
        assert w._file is None and not w._thread.is_alive()
        w.close()
