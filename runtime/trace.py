"""Routing traces: per MoE layer and step, the routed expert ids of every token and which were hits.

A trace is what a bank policy is judged on (``flashmoe-bench policy``). The writer is called from
the decode hot path, so ``record`` only copies the two small arrays into a buffer; every ~1 M ids
the buffer is encoded and compressed (zstandard) as one chunk and written, so a crash loses at most
one chunk. The format is in ``layouts/FORMAT.md`` ("Routing traces"):

    file   = b"FMOETRC1" | u32 header length | header JSON | chunk*
    chunk  = u32 compressed length | zstd frame of:
             u32 n | n records (u16 layer, u16 k, u32 rows, u32 step) |
             ids: per row sorted ascending, delta-coded (first id, then differences), uint16,
                  all low bytes then all high bytes |
             hits: one bit per id in stored order (numpy packbits, little bit order)

Ids inside a row are stored sorted (the router's order carries no meaning; hits follow their ids).
A step is one call per layer: a new step starts when a layer id is not greater than the previous
record's, or after ``end_step()``.
"""

from __future__ import annotations

import atexit
import json
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

MAGIC = b"FMOETRC1"
VERSION = 1
RECORD = np.dtype([("layer", "<u2"), ("k", "<u2"), ("rows", "<u4"), ("step", "<u4")])
CHUNK_IDS = 1 << 20  # ids buffered before a chunk is compressed and written
LEVEL = 3  # higher zstd levels gain < 3 % on routing ids at 5-50 x the time


class TraceError(ValueError):
    """A file that is not a valid routing trace."""


class TraceWriter:
    """Records routed experts per layer call; ``close()`` (or interpreter exit) writes the rest.

    ``record(layer, experts, hit)``: ``experts`` is ``tokens x k`` expert ids of one call of the
    layer, ``hit`` a bool array of the same shape (the expert was resident before the call).
    """

    def __init__(
        self, path: str | Path, *, num_layers: int, num_experts: int, top_k: int, meta: dict
    ):
        if not 0 < num_experts <= 1 << 16:
            raise ValueError(f"a trace holds up to 65536 experts per layer, not {num_experts}")
        self.path = Path(path)
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        header = {
            "format": "flashmoe-trace",
            "version": VERSION,
            "num_layers": num_layers,
            "num_experts": num_experts,
            "top_k": top_k,
            "meta": meta,
        }
        blob = json.dumps(header, sort_keys=True).encode()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(MAGIC + struct.pack("<I", len(blob)) + blob)
        self._file.flush()
        self._zstd = zstandard.ZstdCompressor(level=LEVEL)
        self._lock = threading.Lock()
        self._records: list[tuple[int, int, int, int]] = []
        self._ids: list[np.ndarray] = []
        self._hits: list[np.ndarray] = []
        self._buffered = 0
        self._step = 0
        self._last_layer: int | None = None
        self.rows = 0  # token rows recorded so far, all layers
        atexit.register(self.close)

    def record(self, layer: int, experts: np.ndarray, hit: np.ndarray) -> None:
        """Buffer one call of ``layer``: ``experts`` (tokens x k ints), ``hit`` (same shape)."""
        k = self.top_k
        if experts.shape[-1] != k:
            raise ValueError(f"trace of top-{k} routing got rows of {experts.shape[-1]} experts")
        ids = np.asarray(experts).reshape(-1, k).astype(np.uint16)
        hits = np.asarray(hit, dtype=bool).reshape(ids.shape)
        with self._lock:
            if self._file is None:
                raise ValueError(f"{self.path}: trace is closed")
            if self._last_layer is not None and layer <= self._last_layer:
                self._step += 1
            self._last_layer = layer
            self._records.append((layer, k, ids.shape[0], self._step))
            self._ids.append(ids)
            self._hits.append(hits)
            self._buffered += ids.size
            self.rows += ids.shape[0]
            if self._buffered >= CHUNK_IDS:
                self._flush()

    def end_step(self) -> None:
        """Start a new step with the next record (a step also starts when the layer id wraps)."""
        with self._lock:
            self._last_layer = None
            if self._records and self._records[-1][3] == self._step:
                self._step += 1

    def flush(self) -> None:
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if not self._records or self._file is None:
            return
        records = np.array(self._records, dtype=RECORD)
        parts = [struct.pack("<I", len(records)), records.tobytes()]
        ids = np.concatenate(self._ids)
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        hits = np.take_along_axis(np.concatenate(self._hits), order, axis=1)
        delta = ids.astype("<u2")
        delta[:, 1:] = np.diff(ids, axis=1)
        parts.append(delta.view(np.uint8).reshape(-1, 2).T.tobytes())  # byte planes
        parts.append(np.packbits(hits.ravel(), bitorder="little").tobytes())
        frame = self._zstd.compress(b"".join(parts))
        self._file.write(struct.pack("<I", len(frame)) + frame)
        self._file.flush()
        self._records, self._ids, self._hits, self._buffered = [], [], [], 0

    def close(self) -> None:
        """Write what is buffered and close the file (idempotent)."""
        with self._lock:
            if self._file is None:
                return
            self._flush()
            self._file.close()
            self._file = None
        atexit.unregister(self.close)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class LayerTrace:
    """One layer's rows in recording order: ``experts`` (N x k uint16, each row sorted),
    ``hit`` (N x k bool) and ``step`` (N, the step of each row)."""

    experts: np.ndarray
    hit: np.ndarray
    step: np.ndarray


@dataclass
class Trace:
    num_layers: int
    num_experts: int
    top_k: int
    meta: dict
    layers: dict[int, LayerTrace] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return max((int(t.step[-1]) + 1 for t in self.layers.values() if t.step.size), default=0)


def _header(data: bytes, path) -> tuple[dict, int]:
    """The header of a trace's bytes, and where its chunks start."""
    if data[:8] != MAGIC or len(data) < 12:
        raise TraceError(f"{path}: not a flashmoe routing trace")
    (hlen,) = struct.unpack_from("<I", data, 8)
    try:
        header = json.loads(data[12 : 12 + hlen])
    except ValueError as e:
        raise TraceError(f"{path}: bad trace header: {e}") from None
    if header.get("format") != "flashmoe-trace" or header.get("version") != VERSION:
        raise TraceError(f"{path}: unsupported trace format/version {header.get('version')}")
    return header, 12 + hlen


def append_trace(path: str | Path, other: bytes) -> None:
    """Append the chunks of ``other`` (a whole trace's bytes, header included) to the trace at
    ``path``: how rank 0 gathers the other ranks' layers into one file. Both must trace the
    same model (layers, experts, top-k); the reader keeps each layer's rows in file order, and
    every rank numbers the same forward passes as the same steps."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) == 12:
            head += f.read(struct.unpack_from("<I", head, 8)[0])
    mine, _ = _header(head, path)
    theirs, start = _header(other, f"{path} (another rank's part)")
    keys = ("num_layers", "num_experts", "top_k")
    if [mine[k] for k in keys] != [theirs[k] for k in keys]:
        raise TraceError(f"{path}: another rank traced a different model")
    with open(path, "ab") as f:
        f.write(other[start:])


def read_trace(path: str | Path) -> Trace:
    """Read a trace written by ``TraceWriter`` (a truncated last chunk is an error)."""
    data = Path(path).read_bytes()
    header, pos = _header(data, path)
    per: dict[int, tuple[list, list, list]] = {}
    dctx = zstandard.ZstdDecompressor()
    while pos < len(data):
        if pos + 4 > len(data):
            raise TraceError(f"{path}: truncated chunk header at byte {pos}")
        (clen,) = struct.unpack_from("<I", data, pos)
        frame = data[pos + 4 : pos + 4 + clen]
        if len(frame) != clen:
            raise TraceError(f"{path}: truncated chunk at byte {pos}")
        pos += 4 + clen
        try:
            _decode_chunk(dctx.decompress(frame), header["top_k"], per)
        except (zstandard.ZstdError, ValueError) as e:
            raise TraceError(f"{path}: bad chunk: {e}") from None
    layers = {}
    for layer in sorted(per):
        ids, hits, steps = per[layer]
        layers[layer] = LayerTrace(np.concatenate(ids), np.concatenate(hits), np.concatenate(steps))
    return Trace(
        header["num_layers"], header["num_experts"], header["top_k"], header["meta"], layers
    )


def _decode_chunk(raw: bytes, top_k: int, per: dict) -> None:
    (n,) = struct.unpack_from("<I", raw, 0)
    records = np.frombuffer(raw, dtype=RECORD, count=n, offset=4)
    if (records["k"] != top_k).any():
        raise TraceError(f"a record's k is not the trace's top_k {top_k}")
    rows = int(records["rows"].sum(dtype=np.int64))
    total = rows * top_k
    off = 4 + n * RECORD.itemsize
    if len(raw) != off + 2 * total + (total + 7) // 8:
        raise TraceError("chunk size does not match its records")
    planes = np.frombuffer(raw, dtype=np.uint8, count=2 * total, offset=off).reshape(2, total)
    delta = planes.T.copy().view("<u2").reshape(rows, top_k)
    ids = np.cumsum(delta, axis=1, dtype=np.uint16)
    bits = np.frombuffer(raw, dtype=np.uint8, offset=off + 2 * total)
    hits = np.unpackbits(bits, count=total, bitorder="little").astype(bool).reshape(rows, top_k)
    layer_of = np.repeat(records["layer"], records["rows"])
    order = np.argsort(layer_of, kind="stable")  # rows grouped by layer, in recording order
    layers, starts = np.unique(layer_of[order], return_index=True)
    ids, hits = ids[order], hits[order]
    steps = np.repeat(records["step"], records["rows"])[order]
    bounds = [*starts.tolist(), rows]
    for i, layer in enumerate(layers.tolist()):
        rows_of = slice(bounds[i], bounds[i + 1])
        lists = per.setdefault(layer, ([], [], []))
        lists[0].append(ids[rows_of])
        lists[1].append(hits[rows_of])
        lists[2].append(steps[rows_of])


__all__ = ["LayerTrace", "Trace", "TraceError", "TraceWriter", "append_trace", "read_trace"]
