"""The expert readers (native C pool and Python pool): split reads, buffers, errors, fallback, GIL."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from flashmoe.layouts.plan import record_size, split_plan
from flashmoe.runtime.reader import (
    ReadError,
    ReadRequest,
    advise_dontneed,
    advise_willneed,
    make_reader,
    open_for_reading,
    split_buffers,
    split_requests,
)

try:
    from flashmoe.runtime.native_reader import NativeReader
except ImportError:  # pragma: no cover - the build failed; the Python pool is still tested
    NativeReader = None

KINDS = [
    pytest.param(
        "native", marks=pytest.mark.skipif(NativeReader is None, reason="extension not built")
    ),
    "python",
]

# Component sizes of records: an odd one (nine odd sizes), a 4 KiB multiple, and the 35B geometry
# scaled down (gate/up/down w,s,b with bf16 scales).
GEOMETRIES = [
    [1, 4095, 7, 16385, 3, 333, 12289, 5, 40001],
    [4096] * 3 + [8192] * 3 + [12288] * 3,
    [65536, 4096, 4096, 65536, 4096, 4096, 65536, 4096, 4096],
]


@pytest.fixture(params=KINDS)
def reader(request):
    with make_reader(request.param, threads=4) as r:
        assert r.kind == request.param
        yield r


@pytest.fixture(scope="module")
def datafile(tmp_path_factory):
    """A 2 MiB file of random bytes; returns (path, bytes)."""
    path = tmp_path_factory.mktemp("reader") / "layer.bin"
    data = np.random.default_rng(7).integers(0, 256, 2 << 20, dtype=np.uint8)
    data.tofile(path)
    return str(path), data


@pytest.fixture
def fd(datafile):
    fd = open_for_reading(datafile[0])
    yield fd
    os.close(fd)


def bank_buffers(sizes: list[int]) -> tuple[np.ndarray, tuple[memoryview, ...]]:
    """One contiguous slot of ``sizes`` components, as separate writable views (like a slot bank)."""
    slot = np.zeros(sum(sizes), dtype=np.uint8)
    views, pos = [], 0
    for n in sizes:
        views.append(memoryview(slot)[pos : pos + n])
        pos += n
    return slot, tuple(views)


@pytest.mark.parametrize("kind", KINDS)
def test_every_split_and_alignment_matches_a_plain_read(kind, datafile, fd):
    path, data = datafile
    with make_reader(kind, threads=3) as r:
        for sizes in GEOMETRIES:
            expert = sum(sizes)
            for alignment in (4096, 16384):
                rec = record_size(expert, alignment)
                for n in range(1, 9):
                    requests, slots = [], []
                    for e in range(3):  # one batch for all experts of the "layer", like the runtime
                        slot, bufs = bank_buffers(sizes)
                        slots.append(slot)
                        requests += split_requests(
                            fd, e * rec, bufs, split_plan(expert, alignment, n), path
                        )
                    assert len(requests) == 3 * min(n, -(-expert // alignment))
                    r.read(requests)
                    for e, slot in enumerate(slots):
                        want = data[e * rec : e * rec + expert]
                        assert np.array_equal(slot, want), (sizes, alignment, n, e)


def test_split_buffers_chunks_are_the_plan():
    sizes = GEOMETRIES[0]
    expert = sum(sizes)
    slot, bufs = bank_buffers(sizes)
    slot[:] = np.arange(expert) % 251
    for n in range(1, 9):
        plan = split_plan(expert, 4096, n)
        chunks = split_buffers(bufs, plan)
        assert [s for s, _ in chunks] == [a for a, _ in plan]
        for (_, views), (a, b) in zip(chunks, plan, strict=True):
            got = b"".join(bytes(v) for v in views)
            assert got == bytes(slot[a:b])
            assert all(v.nbytes for v in views) and not any(v.readonly for v in views)


def test_split_buffers_extends_the_last_chunk_over_padding():
    plan = split_plan(10000, 4096, 2)  # [(0, 4096), (4096, 10000)]
    slot, bufs = bank_buffers([6000, 6288])  # 12288 = record_size: O_DIRECT reads the padding too
    chunks = split_buffers(bufs, plan)
    assert [sum(v.nbytes for v in vs) for _, vs in chunks] == [4096, 8192]
    with pytest.raises(ValueError, match="buffers hold"):
        split_buffers(bank_buffers([5000])[1], plan)
    with pytest.raises(ValueError, match="not a split plan"):
        split_buffers(bufs, [(0, 4096), (8192, 10000)])


@pytest.mark.parametrize("kind", KINDS)
def test_reads_into_mlx_arrays(kind, datafile, fd):
    mx = pytest.importorskip("mlx.core")
    path, data = datafile
    shapes = [((64, 32), mx.uint32), ((64, 4), mx.bfloat16), ((64, 4), mx.bfloat16)]
    arrays = [mx.zeros(s, dtype=d) for s, d in shapes]
    mx.eval(*arrays)
    expert = sum(a.nbytes for a in arrays)
    with make_reader(kind, threads=2) as r:
        r.read(
            split_requests(
                fd, 4096, [memoryview(a) for a in arrays], split_plan(expert, 4096, 3), path
            )
        )
    got = b"".join(memoryview(a).cast("B").tobytes() for a in arrays)
    assert got == data[4096 : 4096 + expert].tobytes()
    assert np.array_equal(np.array(arrays[0]).view(np.uint8).ravel(), data[4096 : 4096 + 8192])


def test_native_reader_edge_cases(datafile, fd):
    if NativeReader is None:
        pytest.skip("extension not built")
    path, data = datafile
    with NativeReader(threads=2) as r:
        r.read([])
        # more buffers than IOV_MAX in one request; tuples instead of ReadRequest; empty buffers
        dst = np.zeros(3000 * 100, dtype=np.uint8)
        bufs = tuple(memoryview(dst)[i * 100 : (i + 1) * 100] for i in range(3000))
        r.read([(fd, 123, bufs + (bytearray(0),), path)])
        assert np.array_equal(dst, data[123 : 123 + dst.size])
        # a batch dropped without wait() must finish before its buffers are released
        for _ in range(20):
            r.submit([ReadRequest(fd, 0, (bytearray(1 << 20),), path)] * 4)
        with pytest.raises(BufferError):
            r.read([ReadRequest(fd, 0, (b"read-only",), path)])
    with pytest.raises(ValueError, match="closed"):
        r.read([])


@pytest.mark.parametrize("kind", KINDS)
def test_concurrent_batches(kind, datafile, fd):
    path, data = datafile
    errors = []

    def run(r, seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(20):
                offs = rng.integers(0, data.size - 5000, 8)
                dsts = [bytearray(5000) for _ in offs]
                r.read(
                    [ReadRequest(fd, int(o), (d,), path) for o, d in zip(offs, dsts, strict=True)]
                )
                for o, d in zip(offs, dsts, strict=True):
                    assert d == data[o : o + 5000].tobytes()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    with make_reader(kind, threads=3) as r:
        ts = [threading.Thread(target=run, args=(r, s)) for s in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors


def test_truncated_file_is_an_error(reader, datafile, tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(datafile[1][:10000].tobytes())
    fd = open_for_reading(str(path))
    try:
        good = bytearray(4096)
        requests = [
            ReadRequest(fd, 0, (good,), str(path)),
            ReadRequest(fd, 8192, (bytearray(3000), bytearray(3000)), str(path)),
        ]
        batch = reader.submit(requests)
        with pytest.raises(ReadError) as ei:
            batch.wait()
        e = ei.value
        assert isinstance(e, OSError) and e.errno == errno.EIO
        assert str(path) in str(e) and "offset 8192" in str(e) and "6000 bytes" in str(e)
        assert "end of file after 1808 bytes" in str(e)
        assert good == datafile[1][:4096].tobytes()  # the other reads of the batch completed
        with pytest.raises(ReadError):
            batch.wait()  # the error sticks
        with pytest.raises(ReadError, match="end of file after 0 bytes"):
            reader.read([ReadRequest(fd, 20000, (bytearray(10),), str(path))])
    finally:
        os.close(fd)


def test_closed_fd_is_ebadf(reader, datafile):
    fd = open_for_reading(datafile[0])
    os.close(fd)
    with pytest.raises(ReadError) as ei:
        reader.read([ReadRequest(fd, 4096, (bytearray(100),), "layer-007.bin")])
    assert ei.value.errno == errno.EBADF
    assert (
        "layer-007.bin" in str(ei.value)
        and "offset 4096" in str(ei.value)
        and "100 bytes" in str(ei.value)
    )


def aligned(n: int, alignment: int = 4096) -> np.ndarray:
    raw = np.zeros(n + alignment, dtype=np.uint8)
    skip = -raw.ctypes.data % alignment
    return raw[skip : skip + n]


@pytest.fixture
def direct_fd(datafile):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT")
    try:
        fd = open_for_reading(datafile[0], direct=True)
    except OSError as e:
        pytest.skip(f"O_DIRECT unsupported here: {e}")
    yield fd
    os.close(fd)


def test_o_direct_reads_and_misalignment_errors(reader, datafile, direct_fd):
    path, data = datafile
    buf = aligned(3 * 4096)
    bufs = (memoryview(buf)[:4096], memoryview(buf)[4096:])
    reader.read([ReadRequest(direct_fd, 8192, bufs, path)])
    assert np.array_equal(buf, data[8192 : 8192 + buf.size])
    # split into chunks on 4 KiB pages: every chunk is aligned
    reader.read(split_requests(direct_fd, 0, bufs, split_plan(3 * 4096, 4096, 3), path))
    assert np.array_equal(buf, data[: buf.size])

    cases = [
        (ReadRequest(direct_fd, 100, (memoryview(buf),), path), "offset is not a multiple of 4096"),
        (
            ReadRequest(direct_fd, 0, (memoryview(buf)[:1000],), path),
            "length 1000 is not a multiple",
        ),
        (
            ReadRequest(direct_fd, 0, (memoryview(buf)[24 : 24 + 4096],), path),
            "is not 4096-byte aligned",
        ),
    ]
    for request, why in cases:
        with pytest.raises(ReadError, match="O_DIRECT read") as ei:
            reader.read([request])
        assert ei.value.errno == errno.EINVAL and why in str(ei.value) and path in str(ei.value)


def test_hints_and_cache_drop(datafile, fd):
    advise_willneed(fd, 0, 1 << 20)
    advise_dontneed(fd)
    fd2 = open_for_reading(datafile[0], random=False)
    os.close(fd2)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_fallback_when_extension_is_absent():
    code = (
        "from flashmoe.runtime.reader import make_reader\n"
        "print(make_reader('auto', 2).kind)\n"
        "try:\n    make_reader('native', 2)\nexcept RuntimeError as e:\n    print('forced:', e)\n"
    )
    p = run_python(code, FLASHMOE_DISABLE_NATIVE="1")
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[0] == "python"
    assert out[1].startswith("forced: native reader unavailable")
    notice = p.stderr.strip().splitlines()
    assert len(notice) == 1 and "using the Python pool" in notice[0]
    # the same through a failing import of the extension module itself (sys.modules trick)
    code2 = (
        "import sys\nsys.modules['flashmoe.runtime._native_reader'] = None\n"
        "from flashmoe.runtime.reader import make_reader\nprint(make_reader('auto', 2).kind)\n"
    )
    p = run_python(code2)
    assert p.returncode == 0 and p.stdout.strip() == "python", p.stderr
    assert "not built" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_native_is_the_default_when_built():
    if NativeReader is None:
        pytest.skip("extension not built")
    p = run_python("from flashmoe.runtime.reader import make_reader; print(make_reader().kind)")
    assert p.stdout.strip() == "native" and p.stderr == ""


@pytest.mark.parametrize("kind", KINDS)
def test_wait_releases_the_gil(kind, datafile, fd):
    """A Python thread runs while the main thread waits on a batch.

    With a 100 s switch interval the interpreter never forces a GIL hand-over, so the counter can move
    between the two reads of it only if ``wait()`` released the GIL. Not timing-sensitive: a wait that
    releases the GIL is observed within a few tries; one that doesn't can never be.
    """
    path, _ = datafile
    count = 0
    stop = threading.Event()

    def counter():
        nonlocal count
        while not stop.is_set():
            count += 1
            stop.wait(0.0001)  # releases the GIL between increments

    dst = [bytearray(1 << 20) for _ in range(16)]
    requests = [ReadRequest(fd, 0, (d,), path) for d in dst] * 8  # 128 MiB, a few tens of ms
    old = sys.getswitchinterval()
    t = threading.Thread(target=counter)
    t.start()
    sys.setswitchinterval(100)
    try:
        with make_reader(kind, threads=2) as r:
            for _ in range(20):
                batch = r.submit(requests)
                c0 = count
                batch.wait()
                if count > c0:
                    break
            else:
                pytest.fail("the counter thread never ran during wait(): GIL held")
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()


def test_done_for_asks_about_part_of_a_batch_without_blocking(reader, datafile, fd):
    path, data = datafile
    bufs = [bytearray(4096) for _ in range(3)]
    batch = reader.submit(
        [ReadRequest(fd, i * 4096, (memoryview(b),), path) for i, b in enumerate(bufs)]
    )
    batch.wait_for(0, 1)
    assert batch.done_for(0, 1) and batch.done_for(1, 1)  # an empty range is done
    with pytest.raises(IndexError):
        batch.done_for(0, 4)
    batch.wait()
    assert batch.done_for(0, 3) and batch.done()
    assert b"".join(bufs) == data[: 3 * 4096].tobytes()
