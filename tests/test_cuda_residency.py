"""The CUDA residency path (metal/cuda.py): staged reads copied to device-resident slots.

CI has no GPU. The addressing (which staging bytes go to which slot of which component array, per
split chunk) is the part that can be wrong silently, so it is tested here on the CPU by standing in
for the two CUDA driver calls with a host ``memmove`` (on the CPU backend an MLX array's address is
its device address). The real driver runs in ``test_staged_on_cuda``, skipped without a GPU.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
import pytest
from flashmoe.metal import cuda
from flashmoe.runtime import load
from flashmoe.runtime.reader import PythonReader, ReadRequest
from test_runtime import READERS, reference, streamed


class HostDevice:
    """Stands in for ``cuda.CudaDevice`` where there is no GPU: copies are host ``memmove``s."""

    context = 1

    def __init__(self):
        self.copied = 0
        self._keep = []

    def bind(self) -> None:
        pass

    def pinned(self, nbytes: int) -> memoryview:
        raw = np.zeros(nbytes + 4096, dtype=np.uint8)
        self._keep.append(raw)
        skip = -raw.ctypes.data % 4096
        return memoryview(raw[skip : skip + nbytes]).cast("B")

    def copy_to_device(self, copies) -> None:
        for dst, src, n in copies:
            ctypes.memmove(dst, src, n)
            self.copied += n

    def synchronize(self) -> None:
        pass


class CopyingReader(PythonReader):
    """The Python pool plus the native pool's per-request copies (the fifth request element)."""

    def __init__(self, threads: int = 4):
        super().__init__(threads)
        self.context = None
        self.copied = 0

    def set_device(self, context: int) -> None:
        self.context = context

    def submit(self, requests):
        plain, copies = [], []
        for r in requests:
            if isinstance(r, tuple):
                plain.append(ReadRequest(*r[:4]))
                copies.append(np.frombuffer(r[4], dtype=np.uint64).reshape(-1, 3))
            else:
                plain.append(r)
        batch = super().submit(plain)
        reader = self

        class Done:
            def wait(self):
                batch.wait()
                for triples in copies:
                    for dst, src, n in triples.tolist():
                        ctypes.memmove(dst, src, n)
                        reader.copied += n

        return Done()


@pytest.fixture
def host_device(monkeypatch):
    if cuda.on_cuda():
        pytest.skip("CPU stand-in for the driver; test_staged_on_cuda runs the real one")
    device = HostDevice()
    monkeypatch.setattr(cuda, "detect", lambda sample=None: (device, "staged"))
    return device


def test_detect_is_none_off_cuda(monkeypatch):
    if cuda.on_cuda():
        pytest.skip("this machine runs MLX on CUDA")
    assert cuda.detect() is None
    monkeypatch.setenv("FLASHMOE_CUDA_RESIDENCY", "sideways")
    with pytest.raises(ValueError, match="FLASHMOE_CUDA_RESIDENCY='sideways'"):
        cuda.detect()


@pytest.mark.parametrize("split", [1, 8])
@pytest.mark.parametrize("fraction", [0.25, 0.0])
def test_staged_copies_after_the_wait(layout, host_device, split, fraction):
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, ref_tokens = reference(src)
    model, logits, tokens = streamed(
        out, prompt, bank_experts=max(4, int(16 * fraction)), cache_io_split=split, reader="python"
    )
    store = model.flashmoe.store
    assert store.residency == "staged" and not store._copies_in_pool
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens
    assert host_device.copied >= store.stats.misses * store.index.expert_bytes > 0


@pytest.mark.parametrize("split", [1, 3, 8])
def test_staged_copies_in_the_pool(layout, host_device, monkeypatch, split):
    """Each chunk's copy triples cover exactly its component bytes (padding never copied)."""
    src, out = layout("qwen3_5_moe", alignment=4096)
    readers = []

    def make(kind="auto", threads=8):
        readers.append(CopyingReader(threads))
        return readers[-1]

    monkeypatch.setattr("flashmoe.runtime.loader.make_reader", make)
    prompt, ref_logits, ref_tokens = reference(src)
    model, logits, tokens = streamed(out, prompt, bank_experts=4, cache_io_split=split)
    store = model.flashmoe.store
    assert store._copies_in_pool and readers[0].context == HostDevice.context
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens
    # every byte of every read expert copied once (stats cover the decode only)
    assert readers[0].copied >= store.stats.misses * store.index.expert_bytes > 0
    assert host_device.copied == 0


def test_staged_rounds_when_misses_exceed_staging(layout, host_device):
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, _ = reference(src)
    model, tok = load(str(out), bank_experts=16)
    model.flashmoe.store.bank(0)
    model.flashmoe.store._staging.records = 3  # a prefill union of up to 16 experts: 6 rounds
    logits = np.array(model(mx.array(prompt)[None]).astype(mx.float32))
    assert np.array_equal(logits, ref_logits)


def test_failed_copy_leaves_no_valid_slot(layout, host_device):
    src, out = layout("qwen3_5_moe")
    model, _ = load(str(out), bank_experts=8, reader="python")
    store = model.flashmoe.store

    def broken(copies):
        raise cuda.CudaError("CUDA cuMemcpyHtoDAsync failed: injected")

    host_device.copy_to_device = broken
    with pytest.raises(cuda.CudaError, match="injected"):
        store.ensure(0, [1, 2, 3])
    bank = store.banks[0]
    assert (bank.table == -1).all() and len(bank.free) == bank.slots


@pytest.mark.skipif(not cuda.on_cuda(), reason="needs MLX on a CUDA GPU")
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("mode", ["staged", "prefetch"])
@pytest.mark.parametrize(
    "bank",
    [
        8,
        pytest.param(
            4,
            marks=pytest.mark.xfail(
                reason="on CUDA a prefill split into many token groups differs from stock "
                "mlx-lm by rounding (seen 2026-11-30 with residency off too; CPU is identical)"
            ),
        ),
    ],
)
def test_staged_on_cuda(layout, reader, mode, bank, monkeypatch):
    monkeypatch.setenv("FLASHMOE_CUDA_RESIDENCY", mode)
    src, out = layout("qwen3_5_moe", alignment=4096)
    prompt, ref_logits, ref_tokens = reference(src)
    model, logits, tokens = streamed(
        out, prompt, bank_experts=bank, cache_io_split=4, reader=reader
    )
    assert model.flashmoe.store.residency == mode
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens


def test_shadowed_cuda_build_names_the_fix(tmp_path, monkeypatch):
    """mlx-cpu and mlx-cuda-13 both install mlx/lib/libmlx.so: the overwritten one is named."""
    info = tmp_path / "mlx_cuda_13-0.32.4.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-cuda-13\nVersion: 0.32.4\n")
    (info / "RECORD").write_text("mlx/lib/libmlx.so,sha256=x,1000\n")
    lib = tmp_path / "mlx" / "lib"
    lib.mkdir(parents=True)
    (lib / "libmlx.so").write_bytes(b"\0" * 10)  # another build's copy
    monkeypatch.syspath_prepend(str(tmp_path))
    fix = cuda.shadowed_cuda_build()
    assert fix is not None and "pip install --force-reinstall --no-deps mlx-cuda-13==0.32.4" in fix
    (lib / "libmlx.so").write_bytes(b"\0" * 1000)
    assert cuda.shadowed_cuda_build() is None


@pytest.mark.parametrize("in_pool", [False, True])
def test_staged_read_ahead(layout, host_device, monkeypatch, in_pool):
    """Read-ahead into its own staging area, copied to the slots when the layer settles."""
    src, out = layout("qwen3_5_moe", alignment=4096)
    if in_pool:
        monkeypatch.setattr(
            "flashmoe.runtime.loader.make_reader", lambda kind="auto", threads=8: CopyingReader()
        )
    prompt, ref_logits, ref_tokens = reference(src)
    model, logits, tokens = streamed(
        out, prompt, bank_experts=8, cache_io_split=3, reader="python", prefetch="on"
    )
    store = model.flashmoe.store
    assert store._copies_in_pool == in_pool and store._ahead_areas
    assert store.stats.prefetch_experts > 0
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens
