"""Routing traces: per MoE layer and step, the routed expert ids of every token and which were hits.

A trace is what a bank policy is judged on (``flashmoe-bench policy``). The writer is called from
the decode hot path, so ``record`` only copies the two small arrays into a buffer; every ~1 M ids
the buffer is handed to one background thread, which encodes and compresses it (zstandard) as one
chunk and writes it. At most ``PENDING`` chunks wait for that thread (``record`` blocks for
another), so a crash loses the rows buffered and at most ``PENDING`` chunks. The format is in
``layouts/FORMAT.md`` ("Routing traces"); version 2 (written), per chunk, groups the rows by layer
and relabels each layer's ids by frequency: the popular ids of a row are a bitmap, the others
byte-coded gaps, and where consecutive rows share ids beyond popularity, a row stores which ids of
the previous row it keeps. Version 1 (still read) stores each row's sorted ids delta-coded as
uint16 byte planes.

Ids inside a row are stored sorted (the router's order carries no meaning; hits follow their ids).
A step is one call per layer: a new step starts when a layer id is not greater than the previous
record's, or after ``end_step()``.
"""

from __future__ import annotations

import atexit
import functools
import json
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zstandard

MAGIC = b"FMOETRC1"
VERSION = 2  # 1: ids delta-coded in recording order (still read)
VERSIONS = (1, 2)
RECORD = np.dtype([("layer", "<u2"), ("k", "<u2"), ("rows", "<u4"), ("step", "<u4")])
CHUNK_IDS = 1 << 20  # ids buffered before a chunk is compressed and written
PENDING = 2  # chunks handed to the writer thread and not yet written (the one being written too)
LEVEL = 3  # levels 9 and 19 gain < 1 % on version 2 chunks at 3-300 x the time


class TraceError(ValueError):
    """A file that is not a valid routing trace."""


class TraceWriteError(OSError):
    """Writing a routing trace failed (in the writer thread): the file holds the chunks before."""


class TraceWriter:
    """Records routed experts per layer call; ``close()`` (or interpreter exit) writes the rest.

    ``record(layer, experts, hit)``: ``experts`` is ``tokens x k`` expert ids of one call of the
    layer, ``hit`` a bool array of the same shape (the expert was resident before the call).
    Full chunks are encoded, compressed and written by a background thread; a failure there
    (a full disk) raises ``TraceWriteError`` from the next ``record``, ``flush`` or ``close``.
    """

    def __init__(
        self, path: str | Path, *, num_layers: int, num_experts: int, top_k: int, meta: dict
    ):
        if not 0 < num_experts < 1 << 16:
            raise ValueError(f"a trace holds up to 65535 experts per layer, not {num_experts}")
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
        # the thread takes one chunk and writes it while PENDING - 1 more wait: put() blocks
        # for the next only when PENDING are unwritten, so memory stays bounded
        self._chunks: queue.Queue = queue.Queue(maxsize=PENDING - 1)
        self._error: TraceWriteError | None = None
        self._written = 0  # rows in the file (all layers)
        self._reported = False
        self._thread = threading.Thread(target=self._write_chunks, name="flashmoe-trace")
        self._thread.daemon = True  # close() joins it; atexit runs before daemons stop
        self._thread.start()
        atexit.register(self.close)

    def record(self, layer: int, experts: np.ndarray, hit: np.ndarray) -> None:
        """Buffer one call of ``layer``: ``experts`` (tokens x k ints), ``hit`` (same shape)."""
        k = self.top_k
        if experts.shape[-1] != k:
            raise ValueError(f"trace of top-{k} routing got rows of {experts.shape[-1]} experts")
        ids = np.asarray(experts).reshape(-1, k).astype(np.uint16)  # copies
        hits = np.array(hit, dtype=bool).reshape(ids.shape)  # a copy: the caller may reuse it
        with self._lock:
            self._check()
            if self._last_layer is not None and layer <= self._last_layer:
                self._step += 1
            self._last_layer = layer
            self._records.append((layer, k, ids.shape[0], self._step))
            self._ids.append(ids)
            self._hits.append(hits)
            self._buffered += ids.size
            self.rows += ids.shape[0]
            if self._buffered >= CHUNK_IDS:
                self._hand_over()

    def end_step(self) -> None:
        """Start a new step with the next record (a step also starts when the layer id wraps)."""
        with self._lock:
            self._last_layer = None
            if self._records and self._records[-1][3] == self._step:
                self._step += 1

    def flush(self) -> None:
        """Write what is buffered and wait until every chunk is in the file."""
        with self._lock:
            self._check()
            self._hand_over()
            self._chunks.join()
            self._check()

    def close(self) -> None:
        """Write what is buffered and close the file (idempotent). A failure of the writer
        thread not yet raised by ``record``/``flush`` is raised here."""
        with self._lock:
            if self._file is None:
                return
            try:
                if self._error is None:
                    self._hand_over()
                self._chunks.put(None)
                self._thread.join()
                try:
                    self._file.close()
                except OSError as e:  # the last bytes reach the disk only now
                    self._fail(e)
            finally:
                self._file = None
                atexit.unregister(self.close)
            if self._error is not None and not self._reported:
                self._reported = True
                raise self._error

    def _check(self) -> None:
        if self._error is not None:
            self._reported = True
            raise self._error
        if self._file is None:
            raise ValueError(f"{self.path}: trace is closed")

    def _hand_over(self) -> None:
        """Queue the buffered records as one chunk for the writer thread (the lock is held)."""
        if not self._records:
            return
        chunk = (np.array(self._records, dtype=RECORD), self._ids, self._hits)
        self._records, self._ids, self._hits, self._buffered = [], [], [], 0
        self._chunks.put(chunk)

    def _write_chunks(self) -> None:
        """The writer thread: encode, compress and write each chunk in order, until None."""
        while (chunk := self._chunks.get()) is not None:
            try:
                if self._error is None:  # after a failure the file ends before this chunk
                    records, ids, hits = chunk
                    body = _chunk(self._zstd, records, ids, hits, self.num_experts)
                    self._file.write(body)
                    self._file.flush()
                    self._written += int(records["rows"].sum())
            except BaseException as e:  # surfaces from the caller's next record/flush/close
                self._fail(e)
            finally:
                self._chunks.task_done()
        self._chunks.task_done()

    def _fail(self, e: BaseException) -> None:
        if self._error is None:
            why = f"{type(e).__name__}: {e}".splitlines()[0]
            self._error = TraceWriteError(
                f"{self.path}: writing the routing trace failed ({why}); the file holds only "
                f"its first {self._written:,} rows"
            )

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chunk(
    zstd: zstandard.ZstdCompressor,
    records: np.ndarray,
    ids: list[np.ndarray],
    hits: list[np.ndarray],
    num_experts: int,
) -> bytes:
    """One version 2 chunk as written to the file (length prefix included)."""
    sections = _encode(records, np.concatenate(ids), np.concatenate(hits), num_experts)
    frames = [zstd.compress(s) for s in sections]  # each its own entropy tables
    body = struct.pack(f"<H{len(frames)}I", len(frames), *map(len, frames)) + b"".join(frames)
    return struct.pack("<I", len(body)) + body


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
    if header.get("format") != "flashmoe-trace":
        raise TraceError(f"{path}: not a flashmoe routing trace (format {header.get('format')!r})")
    if header.get("version") not in VERSIONS:
        raise TraceError(
            f"{path}: unsupported trace version {header.get('version')!r} (reads 1, 2)"
        )
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
    keys = ("version", "num_layers", "num_experts", "top_k")
    if [mine[k] for k in keys] != [theirs[k] for k in keys]:
        raise TraceError(f"{path}: another rank traced a different model or trace version")
    with open(path, "ab") as f:
        f.write(other[start:])


def read_trace(path: str | Path) -> Trace:
    """Read a trace written by ``TraceWriter`` (a truncated last chunk is an error)."""
    data = Path(path).read_bytes()
    header, pos = _header(data, path)
    per: dict[int, tuple[list, list, list]] = {}
    dctx = zstandard.ZstdDecompressor()
    k, e, batch = header["top_k"], header["num_experts"], []
    while True:
        try:
            if batch and (pos == len(data) or len(batch) == BATCH):
                _finish(batch, k, e, per)
                batch = []
            if pos == len(data):
                break
        except ValueError as err:
            raise TraceError(f"{path}: bad chunk: {err}") from None
        if pos + 4 > len(data):
            raise TraceError(f"{path}: truncated chunk header at byte {pos}")
        (clen,) = struct.unpack_from("<I", data, pos)
        frame = data[pos + 4 : pos + 4 + clen]
        if len(frame) != clen:
            raise TraceError(f"{path}: truncated chunk at byte {pos}")
        pos += 4 + clen
        try:
            if header["version"] == 1:
                _decode_v1(dctx.decompress(frame), k, per)
            else:
                batch.append(_decode(_sections(frame, dctx), k, e))
        except (zstandard.ZstdError, ValueError, struct.error) as err:
            raise TraceError(f"{path}: bad chunk: {err}") from None
    layers = {}
    for layer in sorted(per):
        ids, hits, steps = per[layer]
        layers[layer] = LayerTrace(np.concatenate(ids), np.concatenate(hits), np.concatenate(steps))
    return Trace(
        header["num_layers"], header["num_experts"], header["top_k"], header["meta"], layers
    )


def _sections(chunk: bytes, dctx: zstandard.ZstdDecompressor) -> bytes:
    """A version 2 chunk's payload: its frames decompressed and concatenated."""
    (m,) = struct.unpack_from("<H", chunk, 0)
    sizes = struct.unpack_from(f"<{m}I", chunk, 2)
    pos, out = 2 + 4 * m, []
    for size in sizes:
        if pos + size > len(chunk):
            raise TraceError("frame sizes exceed the chunk")
        out.append(dctx.decompress(chunk[pos : pos + size]))
        pos += size
    if pos != len(chunk):
        raise TraceError("bytes after the chunk's frames")
    return b"".join(out)


def _decode_v1(raw: bytes, top_k: int, per: dict) -> None:
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
    _add_rows(per, records, order, layers, starts, ids[order], hits[order])


HEAD = 32  # at most this many ids per layer and chunk are relabeled by frequency and bitmapped
POPULAR = 0.1  # ... those in at least this share of the layer's rows (rounded up to 8)
BIG = 0xFFFF  # "no id" while decoding; ids stay below it


def _columns(bits: np.ndarray, width: np.ndarray | None = None) -> list[bytes]:
    """Rows of bits packed (little bit order), one byte column after another; with ``width``
    (bits per row), column ``c`` holds only the rows wider than ``8 c`` bits."""
    packed = np.packbits(bits, axis=1, bitorder="little")
    if width is None:
        return [col.tobytes() for col in packed.T]
    return [col[width > 8 * c].tobytes() for c, col in enumerate(packed.T)]


def _maps(raw: np.ndarray, pos: int, rows: int, nbits: int) -> tuple[np.ndarray, int]:
    """Inverse of ``_columns`` without ``width``: ``nbits`` x ``rows`` bools (a row's bits are
    a column), and the new pos."""
    nb = (nbits + 7) // 8
    if pos + rows * nb > len(raw):
        raise TraceError("chunk shorter than its records")
    packed = raw[pos : pos + rows * nb].reshape(nb, rows)
    bits = np.unpackbits(packed, axis=0, count=nbits, bitorder="little").view(bool)
    return bits, pos + rows * nb


def _words(raw: np.ndarray, pos: int, width: np.ndarray) -> tuple[np.ndarray, int]:
    """Inverse of ``_columns`` with ``width`` (<= 32): each row's bits as one uint32 (bit ``i``
    is the row's bit ``i``, zero from its width on), and the new pos."""
    words = np.zeros(len(width), np.uint32)
    for c in range((int(width.max(initial=0)) + 7) // 8):
        sel = width > 8 * c
        n = int(sel.sum())
        if pos + n > len(raw):
            raise TraceError("chunk shorter than its records")
        col = raw[pos : pos + n].astype(np.uint32) << np.uint32(8 * c)
        if n == len(width):
            words |= col
        else:
            words[sel] |= col
        pos += n
    mask = (np.uint64(1) << width.astype(np.uint64)) - np.uint64(1)
    return words & mask.astype(np.uint32), pos


POP8 = np.array([bin(i).count("1") for i in range(256)], np.int32)  # set bits per byte value
# de Bruijn: bit i of a power of two 1 << i is DEBRUIJN_BIT[((1 << i) * DEBRUIJN) >> 27]
DEBRUIJN = np.uint32(0x077CB531)
DEBRUIJN_BIT = np.zeros(32, np.int32)
DEBRUIJN_BIT[((np.uint32(1) << np.arange(32, dtype=np.uint32)) * DEBRUIJN) >> np.uint32(27)] = (
    np.arange(32)
)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each uint32."""
    b = words.view(np.uint8).reshape(-1, 4)
    return POP8[b[:, 0]] + POP8[b[:, 1]] + POP8[b[:, 2]] + POP8[b[:, 3]]


def _set_bits(words: np.ndarray, count: int) -> np.ndarray:
    """The positions of each uint32's lowest ``count`` set bits, ascending: ``count`` x rows
    (BIG where a word has fewer)."""
    out = np.full((count, len(words)), BIG, np.int32)
    words = words.copy()
    for j in range(count):
        low = words & (~words + np.uint32(1))
        out[j] = np.where(low != 0, DEBRUIJN_BIT[(low * DEBRUIJN) >> np.uint32(27)], BIG)
        words ^= low
    return out


def _h(p: np.ndarray) -> np.ndarray:
    """Binary entropy in bits."""
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def _encode(
    records: np.ndarray, ids: np.ndarray, hits: np.ndarray, num_experts: int
) -> list[bytes]:
    """One chunk in format version 2 (``layouts/FORMAT.md``) as its sections, each to be
    compressed as one zstd frame; ``ids``/``hits`` are rows x k in recording order."""
    rows, k = ids.shape
    e = num_experts
    layer_of = np.repeat(records["layer"], records["rows"])
    order = np.argsort(layer_of, kind="stable")
    ids, hits = ids[order], hits[order]
    layers, starts, counts = np.unique(layer_of[order], return_index=True, return_counts=True)
    nl = len(layers)
    li = np.repeat(np.arange(nl), counts)  # layer index of each row
    freq = np.bincount((li[:, None] * e + ids).ravel(), minlength=nl * e).reshape(nl, e)
    by_freq = np.argsort(-freq, axis=1, kind="stable")
    share = np.take_along_axis(freq, by_freq, axis=1) / np.maximum(counts, 1)[:, None]
    h = np.minimum(-(-(share[:, :HEAD] >= POPULAR).sum(1) // 8) * 8, min(e, HEAD))
    rankmap = np.empty((nl, e), np.uint16)
    steps = records["step"].astype(np.int64)
    table = [
        struct.pack("<I", len(records)),
        records["layer"].astype("<u2").tobytes(),
        records["rows"].astype("<u4").tobytes(),
        np.diff(steps, prepend=0).astype("<u4").tobytes(),
    ]
    for i in range(nl):
        head = by_freq[i, : h[i]]
        rest = np.ones(e, bool)
        rest[head] = False
        rankmap[i, head] = np.arange(h[i])
        rankmap[i, rest] = np.arange(h[i], e)
    key = rankmap[li[:, None], ids].astype(np.uint32) * 2 + hits
    key.sort(axis=1)  # rows in ascending rank, hits with them
    ranks, hits = (key >> 1).astype(np.uint16), (key & 1).astype(bool)
    prev = np.full_like(ranks, BIG)  # each row's previous row of its layer (none: BIG)
    prev[1:] = ranks[:-1]
    prev[starts] = BIG
    same = prev[:, :, None] == ranks[:, None, :]  # [r, j, i]: previous row's j-th is this i-th
    keep, new_loc = same.any(2), ~same.any(1)
    # locality mode where it codes fewer bits (independent-bits estimate per layer)
    n = np.maximum(counts, 1)[:, None]
    fresh = np.bincount((li[:, None] * e + ids)[new_loc], minlength=nl * e).reshape(nl, e)
    kept = np.bincount(li, keep.sum(1), minlength=nl) / (n[:, 0] * k)
    cost0 = _h(freq / n).sum(1)
    cost1 = _h(fresh / n).sum(1) + k * _h(kept)
    modes = (cost1 < cost0).astype(np.uint8)
    lines = [
        struct.pack("<BB", modes[i], h[i]) + by_freq[i, : h[i]].astype("<u2").tobytes()
        for i in range(nl)
    ]
    loc = modes[li].astype(bool)
    new = new_loc | ~loc[:, None]
    hr = h[li]
    head_bits = np.zeros((rows, HEAD), bool)
    r, j = np.nonzero(new & (ranks < hr[:, None]))
    head_bits[r, ranks[r, j]] = True
    tail = np.where(new & (ranks >= hr[:, None]), ranks - hr[:, None], BIG).astype(np.uint16)
    tail.sort(axis=1)
    valid = tail != BIG
    gaps = tail.copy()
    gaps[:, 1:] -= tail[:, :-1] + 1
    gaps = gaps.T[valid.T].astype(np.int64)
    # each gap as bytes 255 x (gap // 255) then gap % 255: near-optimal under zstd's Huffman
    # for geometric-like gaps, and too varied for LZ matches (which cost more than literals)
    ends = np.cumsum(gaps // 255 + 1)
    varint = np.full(int(ends[-1]) if gaps.size else 0, 255, np.uint8)
    varint[ends - 1] = gaps % 255
    return [
        *table,
        b"".join(lines),
        *_columns(keep[loc]),
        *_columns(head_bits, hr),
        varint.tobytes(),
        *_columns(hits),
    ]


def _decode(raw: bytes, top_k: int, num_experts: int) -> _Chunk:
    """A version 2 chunk's rows, up to their kept ranks (``_finish``). Rows are columns here
    (k x rows arrays): each step is a few vector ops over all rows."""
    k, e = top_k, num_experts
    (n,) = struct.unpack_from("<I", raw, 0)
    records = np.zeros(n, RECORD)
    records["layer"] = np.frombuffer(raw, "<u2", count=n, offset=4)
    records["rows"] = np.frombuffer(raw, "<u4", count=n, offset=4 + 2 * n)
    records["step"] = np.cumsum(np.frombuffer(raw, "<u4", count=n, offset=4 + 6 * n))
    pos = 4 + 10 * n
    layer_of = np.repeat(records["layer"], records["rows"])
    order = np.argsort(layer_of, kind="stable")
    layers, starts, counts = np.unique(layer_of[order], return_index=True, return_counts=True)
    rows, nl = len(order), len(layers)
    li = np.repeat(np.arange(nl), counts)
    modes, h = np.zeros(nl, np.uint8), np.zeros(nl, np.int64)
    inv = np.empty((nl, e), np.uint16)
    for i in range(nl):
        modes[i], h[i] = struct.unpack_from("<BB", raw, pos)
        head = np.frombuffer(raw, "<u2", count=h[i], offset=pos + 2)
        pos += 2 + 2 * h[i]
        rest = np.ones(e, bool)
        rest[head[head < e]] = False
        if modes[i] > 1 or h[i] > HEAD or rest.sum() != e - h[i]:
            raise TraceError(f"bad table entry of layer {layers[i]}")
        inv[i] = np.concatenate([head, np.flatnonzero(rest)])
    buf = np.frombuffer(raw, np.uint8)
    loc = modes[li].astype(bool)
    keep = np.zeros((k, rows), bool)
    keep[:, loc], pos = _maps(buf, pos, int(loc.sum()), k)
    hr = h[li]
    head_words, pos = _words(buf, pos, hr)
    nh = _popcount(head_words)
    ntail = k - keep.sum(0) - nh
    if (ntail < 0).any():
        raise TraceError("a row has more than top_k ids")
    total = int(ntail.sum())
    varint = buf[pos:]
    ends = np.flatnonzero(varint != 255)[:total]
    if len(ends) < total:
        raise TraceError("chunk shorter than its records")
    sums = np.cumsum(varint[: ends[-1] + 1] if total else varint[:0], dtype=np.int64)[ends]
    col = np.arange(k)[:, None]
    tail = np.zeros((k, rows), np.int32)  # gaps g_j, then v_j + h = g_0 + ... + g_j + j + h
    tail[col < ntail] = np.minimum(np.diff(sums, prepend=0), e)  # g_0 of each row, then g_1...
    pos += int(ends[-1]) + 1 if total else 0
    if len(raw) != pos + rows * ((k + 7) // 8):
        raise TraceError("chunk size does not match its records")
    tail[0] += hr
    for j in range(1, k):
        tail[j] += tail[j - 1] + 1
    # a row's new ranks: the bitmap's (ascending, < h) in its first nh places, the gaps' (>= h)
    # in its last ntail places, last first; BIG between, where the kept ranks go
    ranks = np.where(col >= k - ntail, tail[::-1], BIG)
    for j, bit in enumerate(_set_bits(head_words, int(nh.max(initial=0)))):
        ranks[j] = np.where(j < nh, bit, ranks[j])
    # a place's hit flag is that of its rank's place in the row's ascending ranks
    small = np.int16 if k < 1 << 14 else np.int64  # narrow: these are k x rows passes
    place = np.where(col < nh, col.astype(small), (nh + k - 1).astype(small) - col.astype(small))
    place[:, loc] = col  # rows of mode 1 are sorted by _finish
    hits, _ = _maps(buf, pos, rows, k)
    at = place.astype(np.int32 if k * rows < 1 << 31 else np.int64)
    at *= rows
    at += np.arange(rows, dtype=at.dtype)
    return _Chunk(records, order, layers, starts, counts, modes, inv, ranks, keep, hits.ravel()[at])


@dataclass
class _Chunk:
    """A decoded version 2 chunk whose mode 1 rows lack their kept ranks (BIG there)."""

    records: np.ndarray
    order: np.ndarray  # recorded row -> place in the chunk's rows (grouped by layer)
    layers: np.ndarray
    starts: np.ndarray  # the first row of each layer
    counts: np.ndarray
    modes: np.ndarray
    inv: np.ndarray  # per layer: rank -> id
    ranks: np.ndarray  # k x rows: each row's ranks (mode 1: new ranks, ascending, then BIG)
    keep: np.ndarray  # k x rows: the keep maps of mode 1 rows
    hits: np.ndarray  # k x rows: the hit flag of each place of ``ranks``

    def loc_rows(self) -> np.ndarray:
        """The rows of mode 1 layers."""
        lay = np.flatnonzero(self.modes)
        return np.concatenate(
            [np.arange(self.starts[i], self.starts[i] + self.counts[i]) for i in lay]
        )


BATCH = 16  # chunks whose mode 1 rows are resolved together (one row of each layer per step)


def _finish(batch: list[_Chunk], k: int, e: int, per: dict) -> None:
    """Resolve the kept ranks of ``batch``'s mode 1 rows, then add every row to ``per`` as
    ascending ids with their hit flags."""
    loc = [(c, c.loc_rows()) for c in batch if c.modes.any()]
    if loc:  # a row = the kept ranks of its layer's previous row, and its new ranks
        rk = np.concatenate([_rows(c.ranks, rows) for c, rows in loc])
        keep = np.concatenate([_rows(c.keep, rows) for c, rows in loc])
        counts = np.concatenate([c.counts[c.modes == 1] for c, _ in loc])
        by = np.argsort(-counts, kind="stable")  # layers with the most rows first
        starts = (np.cumsum(counts) - counts)[by]
        active = counts[by]
        state = np.full((len(counts), k), BIG, rk.dtype)
        for i in range(int(active[0])):
            m = int(np.searchsorted(-active, -i, side="left"))  # layers with > i rows
            r = starts[:m] + i
            both = np.concatenate([np.where(keep[r], state[:m], BIG), rk[r]], axis=1)
            both.sort(axis=1)
            state[:m] = rk[r] = both[:, :k]
        at = 0
        for c, rows in loc:
            c.ranks[:, rows] = rk[at : at + len(rows)].T
            at += len(rows)
    for c in batch:
        _ids(c, k, e, per)


def _rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``rows`` of a k x rows array, as rows x k."""
    a = np.ascontiguousarray(a.T)  # a transposed copy, then whole rows: far faster than columns
    return a if len(rows) == len(a) else a[rows]


def _ids(c: _Chunk, k: int, e: int, per: dict) -> None:
    ranks, rows = c.ranks, c.ranks.shape[1]
    if (ranks >= e).any():
        raise TraceError("an expert id out of range")
    key = np.empty((k, rows), np.uint16 if e <= 1 << 15 else np.uint32)
    bounds = [*c.starts.tolist(), rows]
    for i in range(len(c.layers)):
        part = slice(bounds[i], bounds[i + 1])
        np.take(c.inv[i], ranks[:, part], out=key[:, part])
    key <<= 1
    key |= c.hits
    _sort_columns(key)  # the reader's rows are in ascending id order
    key = np.ascontiguousarray(key.T)
    ids, hits = (key >> 1).astype(np.uint16), (key & 1).astype(bool)
    _add_rows(per, c.records, c.order, c.layers, c.starts, ids, hits)


def _sort_columns(a: np.ndarray) -> None:
    """Sort each column of ``a`` in place (a sorting network: vector ops over all columns)."""
    for i, j in _network(len(a)):
        low = np.minimum(a[i], a[j])
        np.maximum(a[i], a[j], out=a[j])
        a[i] = low


@functools.cache
def _network(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort on ``n`` values: its compare-exchange pairs (``i < j``:
    the smaller value goes to ``i``), those touching a place ``>= n`` (a +inf pad) left out."""
    pairs, size = [], 1
    while size < n:
        size *= 2
    p = 1
    while p < size:
        q = p
        while q >= 1:
            for j in range(q % p, size - q, 2 * q):
                for i in range(min(q, size - j - q)):
                    if (i + j) // (2 * p) == (i + j + q) // (2 * p) and i + j + q < n:
                        pairs.append((i + j, i + j + q))
            q //= 2
        p *= 2
    return pairs


def _add_rows(per: dict, records, order, layers, starts, ids, hits) -> None:
    """Append a chunk's rows to ``per`` (layer -> ids, hits, steps lists). ``ids``/``hits`` are
    grouped by layer (``order`` of the recorded rows; layer ``layers[i]`` from ``starts[i]``)."""
    steps = np.repeat(records["step"], records["rows"])[order]
    bounds = [*starts.tolist(), len(order)]
    for i, layer in enumerate(layers.tolist()):
        part = slice(bounds[i], bounds[i + 1])
        lists = per.setdefault(layer, ([], [], []))
        lists[0].append(ids[part])
        lists[1].append(hits[part])
        lists[2].append(steps[part])


__all__ = [
    "LayerTrace",
    "Trace",
    "TraceError",
    "TraceWriteError",
    "TraceWriter",
    "append_trace",
    "read_trace",
]
