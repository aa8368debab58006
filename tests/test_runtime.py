"""The streamed model against stock mlx-lm: bit-identical logits and greedy tokens."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from flashmoe.layouts import LayoutError
from flashmoe.runtime import load
from flashmoe.runtime.reader import make_reader
from mlx_lm.sample_utils import make_sampler

FAMILIES = ["qwen3_5_moe", "qwen3_5_moe_flat", "qwen3_moe", "qwen3_next"]
LONG_TEXT = (
    "Streaming experts from a solid state disk lets a laptop run a model larger than its memory. "
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris. " * 2
)
SHORT_TEXT = "The quick brown fox jumps over the lazy dog."


def _native_available() -> bool:
    try:
        make_reader("native", threads=1).close()
        return True
    except RuntimeError:
        return False


READERS = [
    "python",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(not _native_available(), reason="native reader not built"),
    ),
]

_reference_cache: dict = {}


def reference(src, text: str = LONG_TEXT, max_tokens: int = 32):
    """Stock mlx-lm on the source checkpoint: (prompt, prefill logits, greedy tokens)."""
    key = (str(src), text, max_tokens)
    if key not in _reference_cache:
        model, tok = mlx_lm.load(str(src))
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        logits = model(mx.array(prompt)[None])
        tokens = [
            r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=max_tokens)
        ]
        _reference_cache[key] = (prompt, np.array(logits.astype(mx.float32)), tokens)
    return _reference_cache[key]


def streamed(layout_dir, prompt, max_tokens: int = 32, **options):
    model, tok = load(str(layout_dir), **options)
    logits = np.array(model(mx.array(prompt)[None]).astype(mx.float32))
    model.flashmoe.store.stats.reset()
    tokens = [r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=max_tokens)]
    return model, logits, tokens


# Each split with one reader (both readers x splits 1, 3, 8: test_readers_and_splits), to keep CI short.
@pytest.mark.parametrize(
    ("reader", "split"),
    [("python", 1), pytest.param("native", 4, marks=READERS[1].marks)],
)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25, 0.0])
def test_bit_identical_to_mlx_lm(layout, family, fraction, split, reader):
    src, out = layout(family)
    prompt, ref_logits, ref_tokens = reference(src)
    index = json.loads((out / "flashmoe-index.json").read_text())
    experts, top_k = index["num_experts"], index["top_k"]
    slots = max(top_k, int(experts * fraction))
    model, logits, tokens = streamed(
        out, prompt, bank_experts=slots, cache_io_split=split, reader=reader
    )
    assert np.array_equal(logits, ref_logits), "prefill logits differ from mlx-lm"
    assert tokens == ref_tokens, "greedy tokens differ from mlx-lm"
    stats = model.flashmoe.store.stats
    size = index["expert_bytes"]
    # the rest of the bytes were read ahead (the default where it was measured to win): whole
    # experts, at least every guess that a layer used, at most every guess submitted
    ahead = stats.bytes_read - stats.misses * size
    assert ahead % size == 0 and stats.prefetch_used * size <= ahead <= stats.prefetch_bytes
    if slots < experts:
        assert stats.misses > 0  # evictions happened during decode


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("split", [1, 3, 8])
def test_readers_and_splits(layout, reader, split):
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, ref_tokens = reference(src)
    _, logits, tokens = streamed(
        out, prompt, bank_experts=5, cache_io_split=split, reader=reader, io_threads=3
    )
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens


def test_prefill_longer_than_bank_reads_each_expert_once_per_group(layout):
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, _ = reference(src)
    model, tok = load(str(out), bank_experts=4)
    stats = model.flashmoe.store.stats
    logits = model(mx.array(prompt)[None])
    mx.eval(logits)
    assert np.array_equal(np.array(logits.astype(mx.float32)), ref_logits)
    # The prompt routes to (far) more distinct experts than 4 slots, so it was split into groups,
    # and each group read only the experts it lacked: misses <= distinct (token, expert) pairs.
    layers = len(model.flashmoe.index.layers)
    assert stats.calls > layers
    assert stats.misses <= len(prompt) * 4 * layers


def test_full_bank_is_filled_at_load_and_never_reads_again(layout):
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, ref_tokens = reference(src)
    model, logits, tokens = streamed(out, prompt, bank_experts=16)
    assert tokens == ref_tokens
    assert np.array_equal(logits, ref_logits)
    store = model.flashmoe.store
    assert store.complete and store.filled and not store.syncs
    assert "every expert read at load" in model.flashmoe.budget_note
    assert store.stats.misses == store.stats.bytes_read == 0  # the fill is not counted
    for bank in store.banks.values():
        assert bank.complete and all(e == s for e, s in bank.slot_of.items())  # slot e: expert e


def test_full_bank_without_fill_reads_every_expert_at_most_once(layout):
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, ref_tokens = reference(src)
    model, logits, tokens = streamed(out, prompt, bank_experts=16, fill_bank=False)
    assert tokens == ref_tokens
    model2, _ = load(str(out), bank_experts=16, fill_bank=False)
    store = model2.flashmoe.store
    assert not store.filled and store.syncs and store.stats.misses == 0
    model2(mx.array(prompt)[None])
    for layer, bank in store.banks.items():
        assert store.stats.per_layer_misses[layer] == len(bank.slot_of)
        assert bank.slot_of and all(e == s for e, s in bank.slot_of.items())  # slot e: expert e
    # the MoE layers sync (and commit early) until the last expert is in, then never again
    assert store.complete == all(b.complete for b in store.banks.values())
    assert store.syncs == (not store.complete)
    for layer in store.banks:
        store.ensure(layer, list(range(16)))
    assert store.complete and not store.syncs and not store.filled


def test_warm_up_empties_a_partial_bank_and_keeps_a_filled_one(layout):
    from flashmoe.runtime.firstuse import warm_up

    _, out = layout("qwen3_5_moe")
    for slots, kept in ((8, False), (16, True)):
        model, _ = load(str(out), bank_experts=slots)
        warm_up(model, [1, 2, 3], err=io.StringIO())
        banks = model.flashmoe.store.banks.values()
        assert all(bool(b.slot_of) == kept for b in banks)
        assert model.flashmoe.store.filled == kept


def test_fill_refuses_a_partial_bank(layout):
    _, out = layout("qwen3_5_moe")
    with pytest.raises(ValueError, match="cannot hold all 16 experts"):
        load(str(out), bank_experts=8, fill_bank=True)


def test_sampling_with_seed_reproduces_and_matches_mlx_lm(layout):
    src, out = layout("qwen3_5_moe")
    prompt, _, _ = reference(src)
    sampler = make_sampler(temp=0.9, top_p=0.95)

    def run(model, tok):
        mx.random.seed(1234)
        return [
            r.token
            for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=24, sampler=sampler)
        ]

    model, tok = load(str(out), bank_experts=6)
    first, second = run(model, tok), run(model, tok)
    ref_model, ref_tok = mlx_lm.load(str(src))
    assert first == second == run(ref_model, ref_tok)


def test_reduced_k_routes_fewer_experts_and_warns(layout, capsys):
    src, out = layout("qwen3_5_moe")
    model, tok = load(str(out), bank_experts=4, k=2)
    assert "routing 2 experts per token instead of 4" in capsys.readouterr().err
    stats = model.flashmoe.store.stats
    layers = len(model.flashmoe.index.layers)
    stats.reset()
    mx.eval(model(mx.array([[5]])))  # one token: exactly 2 distinct experts per layer
    assert stats.hits + stats.misses == 2 * layers
    ref_model, _ = mlx_lm.load(str(src))
    for block in ref_model.language_model.model.layers:
        block.mlp.top_k = 2
    prompt = tok.encode("Hello world")
    assert np.array_equal(
        np.array(model(mx.array(prompt)[None]).astype(mx.float32)),
        np.array(ref_model(mx.array(prompt)[None]).astype(mx.float32)),
    )


def test_batched_rows_match_mlx_lm_batch(layout):
    """Two sequences in one batch (their experts' union read once per layer) equal mlx-lm's batch."""
    src, out = layout("qwen3_5_moe")
    model, tok = load(str(out), bank_experts=8)
    a = tok.encode("The quick brown fox jumps over the lazy dog.")
    b = tok.encode("What is the capital of France? Paris is.")
    n = min(len(a), len(b))
    batch = mx.array([a[:n], b[:n]])
    both = np.array(model(batch).astype(mx.float32))
    ref_model, _ = mlx_lm.load(str(src))
    ref = np.array(ref_model(batch).astype(mx.float32))
    assert np.array_equal(both, ref)


def test_read_failure_leaves_no_valid_slot(layout, tmp_path):
    import shutil

    src, out = layout("qwen3_5_moe")
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    model, tok = load(str(copy), bank_experts=4, reader="python")
    store = model.flashmoe.store
    layer_file = copy / model.flashmoe.index.layers[0].file
    with open(layer_file, "r+b") as f:
        f.truncate(model.flashmoe.index.record_size)  # only expert 0 survives
    with pytest.raises(OSError, match="end of file"):
        store.ensure(model.flashmoe.index.layers[0].layer, [1, 2, 3])
    bank = store.banks[model.flashmoe.index.layers[0].layer]
    assert not set(bank.slot_of) & {1, 2, 3}


# ---- the CLI -------------------------------------------------------------------------------


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.cli", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def test_cli_generates_same_text_as_mlx_lm(layout):
    src, out = layout("qwen3_5_moe")
    r = run_cli(
        out,
        "--prompt",
        "Hello world",
        "--max-tokens",
        "12",
        "--bank-experts",
        "6",
        "--timing",
        "--cache-io-split",
        "2",
    )
    assert r.returncode == 0, r.stderr
    ref = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "generate",
            "--model",
            str(src),
            "--prompt",
            "Hello world",
            "--max-tokens",
            "12",
            "--verbose",
            "False",
        ],
        capture_output=True,
        text=True,
    )
    assert ref.returncode == 0, ref.stderr
    assert r.stdout.strip() == ref.stdout.strip()
    for field in (
        "TTFT",
        "tok/s",
        "hit rate",
        "MB read",
        "expert I/O",
        "router sync",
        "router syncs",
        "streaming host",
        "expert compute",
    ):
        assert field in r.stderr


def test_cli_reads_prompt_from_stdin(layout):
    _, out = layout("qwen3_5_moe")
    r = run_cli(out, "--prompt", "-", "--max-tokens", "4", stdin="Hello")
    assert r.returncode == 0, r.stderr


def _one_line_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("flashmoe-run: error:")]
    assert len(errors) == 1, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]


def test_cli_bad_inputs(layout, tmp_path):
    import shutil

    _, out = layout("qwen3_5_moe")
    _one_line_error(run_cli(tmp_path / "missing"), "missing")
    _one_line_error(run_cli(tmp_path), "flashmoe-index.json")  # a directory but not a layout
    _one_line_error(run_cli(out, "--k", "99"), "--k 99")
    _one_line_error(run_cli(out, "--bank-experts", "2"), "bank of 2")
    _one_line_error(run_cli(out, "--memory-budget", "0.01"), "memory budget")
    _one_line_error(run_cli(out, "--memory-budget", "0"), "memory budget 0.00 GiB")
    _one_line_error(run_cli(out, "--cache-io-split", "9"), "1..8")

    bad = tmp_path / "badversion"
    shutil.copytree(out, bad)
    index = json.loads((bad / "flashmoe-index.json").read_text())
    index["version"] = 99
    (bad / "flashmoe-index.json").write_text(json.dumps(index))
    _one_line_error(run_cli(bad), "version 99")

    trunc = tmp_path / "truncated"  # [R19]: a layer file of the wrong size
    shutil.copytree(out, trunc)
    layer = trunc / index["layers"][1]["file"]
    with open(layer, "r+b") as f:
        f.truncate(layer.stat().st_size - 100)
    _one_line_error(run_cli(trunc), "truncated", index["layers"][1]["file"].split("/")[-1])

    corrupt = tmp_path / "corrupt"
    shutil.copytree(out, corrupt)
    layer = corrupt / index["layers"][0]["file"]
    data = bytearray(layer.read_bytes())
    for e in range(index["num_experts"]):  # flip a byte in every expert of layer 0
        data[e * index["record_size"] + 10] ^= 0xFF
    layer.write_bytes(bytes(data))
    _one_line_error(run_cli(corrupt, "--verify", "--max-tokens", "2"), "checksum mismatch")


def test_direct_io_is_bit_identical(layout, reader="auto", split=3):
    """O_DIRECT reads into page-aligned bank arrays (4 KiB-multiple tensors, padded records).

    One reader (native where built): both readers' O_DIRECT reads and alignment errors are
    covered in test_reader.py, without a model around them.
    """
    src, out = layout("qwen3_5_moe", hidden=512, moe_intermediate=256)
    index = json.loads((out / "flashmoe-index.json").read_text())
    assert index["record_size"] > index["expert_bytes"]  # the padding goes to a scratch buffer
    # a short prompt: the larger model makes the long one's token groups slow on CI
    prompt, ref_logits, ref_tokens = reference(src, SHORT_TEXT, max_tokens=12)
    model, logits, tokens = streamed(
        out, prompt, 12, bank_experts=6, cache_io_split=split, reader=reader, direct_io=True
    )
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens
    assert model.flashmoe.store.stats.misses > 0


def test_direct_io_refuses_unaligned_tensors(layout):
    _, out = layout("qwen3_5_moe")
    with pytest.raises(ValueError, match="multiple of 4096"):
        load(str(out), bank_experts=6, direct_io=True)


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs /proc/self/io")
@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("split", [1, 5])
def test_bytes_read_are_misses_times_expert_bytes(layout, reader, split):
    """The kernel's own count of bytes read (rchar) matches misses x expert bytes."""
    _, out = layout("qwen3_5_moe")
    model, _ = load(str(out), bank_experts=5, cache_io_split=split, reader=reader)
    store, index = model.flashmoe.store, model.flashmoe.index
    layer = index.layers[0].layer
    store.ensure(layer, [0])  # open the file and warm up the pool first
    store.stats.reset()
    probe = _rchar()
    before = _rchar()  # reading /proc/self/io itself counts: subtract that
    store.ensure(layer, [3, 7, 11])
    store.ensure(layer, [3, 12, 13, 14, 15])  # 3 is a hit; 7 and 11 get evicted
    read = _rchar() - before - (before - probe)
    assert store.stats.misses == 3 + 4 and store.stats.hits == 1
    assert store.stats.bytes_read == 7 * index.expert_bytes
    # Up to a few bytes of slack: /proc/self/io's own text grows when a counter gains a digit.
    assert 0 <= read - 7 * index.expert_bytes < 64


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _reader_threads() -> set[int]:
    """The live read-pool threads; other tests' threads may start or end meanwhile, so only these count."""
    import threading

    return {t.ident for t in threading.enumerate() if t.name.startswith("flashmoe-io")}


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="needs /proc/self/fd")
def test_close_and_garbage_collection_release_files_and_threads(layout):
    import gc

    _, out = layout("qwen3_5_moe")
    prompt = [1, 2, 3]
    gc.collect()
    fds, threads = _open_fds(), _reader_threads()
    for _ in range(3):
        model, _ = load(str(out), bank_experts=4, reader="python", io_threads=3)
        model(mx.array(prompt)[None])
        model.flashmoe.close()
    model, _ = load(str(out), bank_experts=4, reader="python", io_threads=3)
    model(mx.array(prompt)[None])
    assert _open_fds() > fds
    del model
    gc.collect()
    assert _open_fds() == fds
    assert _reader_threads() <= threads


def test_failed_load_releases_the_reader(layout, tmp_path):
    import gc
    import shutil

    _, out = layout("qwen3_5_moe")
    copy = tmp_path / "nodense"
    shutil.copytree(out, copy)
    (copy / "model-dense.safetensors").unlink()
    gc.collect()
    fds, threads = _open_fds(), _reader_threads()
    with pytest.raises(LayoutError, match="model-dense.safetensors: missing"):  # [R19]
        load(str(copy), bank_experts=4, reader="python", io_threads=3)
    gc.collect()
    assert _open_fds() == fds
    assert _reader_threads() <= threads
