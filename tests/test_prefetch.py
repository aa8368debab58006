"""Next-layer read-ahead (``prefetch``): only residency changes, never the output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flashmoe.runtime import load
from flashmoe.runtime.reader import ReadError
from test_runtime import READERS, reference, streamed

NATIVE_MARKS = READERS[1].marks  # skipped where the native reader is not built
CASES = [
    *[("qwen3_5_moe", f, "python") for f in (0.5, 0.25, 0.0)],
    *[pytest.param("qwen3_5_moe", f, "native", marks=NATIVE_MARKS) for f in (0.5, 0.25, 0.0)],
    ("qwen3_moe", 0.25, "python"),
    ("qwen3_next", 0.25, "python"),
]


@pytest.mark.parametrize(("family", "fraction", "reader"), CASES)
def test_prefetch_on_is_bit_identical(layout, family, fraction, reader):
    src, out = layout(family)
    prompt, ref_logits, ref_tokens = reference(src)
    index = json.loads((out / "flashmoe-index.json").read_text())
    slots = max(index["top_k"], int(index["num_experts"] * fraction))
    model, logits, tokens = streamed(
        out, prompt, bank_experts=slots, cache_io_split=4, reader=reader, prefetch="on"
    )
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens
    model.flashmoe.store.settle_all()  # unused guesses may still be landing
    s = model.flashmoe.store.stats
    assert s.prefetch_experts > 0
    assert 0 <= s.prefetch_used <= s.prefetch_experts
    # every byte read is a demand miss or a read-ahead expert, once
    assert s.bytes_read == (s.misses + s.prefetch_experts) * index["expert_bytes"]
    assert s.prefetch_unused_bytes == (s.prefetch_experts - s.prefetch_used) * index["expert_bytes"]


def test_prefetch_off_reads_nothing_ahead(layout):
    src, out = layout("qwen3_5_moe")
    prompt, _, ref_tokens = reference(src)
    model, _, tokens = streamed(out, prompt, bank_experts=8, prefetch="off")
    assert tokens == ref_tokens
    assert model.flashmoe.store.stats.prefetch_experts == 0


def test_auto_needs_room_for_guesses(layout):
    _, out = layout("qwen3_5_moe")
    model, _ = load(str(out), bank_experts=4, prefetch="auto")
    store = model.flashmoe.store
    k = model.flashmoe.top_k
    assert store.slots < 2 * k and not store.prefetch_wanted(k)
    model, _ = load(str(out), bank_experts=2 * k, prefetch="auto")
    assert model.flashmoe.store.prefetch_wanted(k)
    model.flashmoe.store._precision = 0.0  # a run of wrong guesses: probe only every 16th call
    assert sum(model.flashmoe.store.prefetch_wanted(k) for _ in range(32)) == 2


def test_default_reads_ahead_on_cuda_and_the_cpu(layout, monkeypatch):
    """No ``prefetch`` given: ``auto``, with the experts launched before the router sync
    (presync), where MLX computes on CUDA or on the CPU (measured to win there), ``off`` and no
    presync on Metal (not measured); 16 read threads on CUDA, 8 elsewhere. ``flashmoe-run``
    passes None unless ``--prefetch`` / ``--io-threads`` is given."""
    from flashmoe.runtime import store as store_mod
    from flashmoe.runtime.cli import build_parser

    _, out = layout("qwen3_5_moe")
    model, _ = load(str(out), bank_experts=8)
    store = model.flashmoe.store
    measured = store_mod.overlap_measured()  # this machine's backend
    assert store.prefetch_mode == ("auto" if measured else "off")
    assert store.presync == store.eager_layers == measured
    mx = store_mod.mx
    monkeypatch.setattr(store_mod.cuda, "on_cuda", lambda: True)
    assert store_mod.default_prefetch() == "auto" and store_mod.default_io_threads() == 16
    monkeypatch.setattr(store_mod.cuda, "on_cuda", lambda: False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)  # MLX's CPU backend
    assert store_mod.default_prefetch() == "auto" and store_mod.default_io_threads() == 8
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # Metal
    assert store_mod.default_prefetch() == "off" and not store_mod.overlap_measured()
    args = build_parser().parse_args([str(out), "-p", "hi"])
    assert args.prefetch is None and args.io_threads is None
    assert build_parser().parse_args([str(out), "-p", "hi", "--prefetch", "on"]).prefetch == "on"


def test_failed_read_ahead_leaves_no_valid_slot(layout, tmp_path):
    import shutil

    _, src_out = layout("qwen3_5_moe")
    out = tmp_path / "layout"
    shutil.copytree(src_out, out)
    model, _ = load(str(out), bank_experts=8, prefetch="on", reader="python")
    store = model.flashmoe.store
    layer = store.index.layers[0]
    store.bank(layer.layer)
    os.truncate(out / layer.file, store.index.record_size * 2)  # experts >= 2 now hit EOF
    store.prefetch(layer.layer, [3, 4, 5])
    with pytest.raises(ReadError):
        store.ensure(layer.layer, [3, 6])
    bank = store.banks[layer.layer]
    assert (bank.table[[3, 4, 5]] == -1).all()
    with pytest.raises(ValueError, match="prefetch must be one of"):
        load(str(out), bank_experts=8, prefetch="sometimes")


def test_cli_timing_reports_warm_up_and_read_ahead(layout):
    from test_runtime import run_cli

    _, out = layout("qwen3_5_moe")
    r = run_cli(out, "--prompt", "Hello world", "--max-tokens", "8", "--bank-experts", "8",
                "--timing", "--prefetch", "on")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "[timing] warm-up" in r.stderr and "not counted in TTFT" in r.stderr
    assert "expert I/O" in r.stderr and "ms exposed" in r.stderr
    assert "[timing] read-ahead (whole run):" in r.stderr and "precision" in r.stderr


@pytest.mark.parametrize("policy", ["lfu", "lfuda"])
def test_bank_policies_change_residency_not_output(layout, policy):
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, ref_tokens = reference(src)
    model, logits, tokens = streamed(out, prompt, bank_experts=6, bank_policy=policy)
    assert np.array_equal(logits, ref_logits)
    assert tokens == ref_tokens
    bank = next(iter(model.flashmoe.store.banks.values()))
    assert type(bank.policy).__name__ == {"lfu": "LFUPolicy", "lfuda": "LFUDAPolicy"}[policy]
    with pytest.raises(ValueError, match="unknown bank policy"):
        load(str(out), bank_policy="mru")


def test_hits_first_is_bit_identical(layout, monkeypatch):
    """Decode steps with hits and misses compute the hits before the misses land: same output."""
    from flashmoe.runtime.streaming import StreamingSwitchGLU

    calls = []
    real = StreamingSwitchGLU._hits_first

    def counting(self, *a):
        calls.append(self.layer)
        return real(self, *a)

    monkeypatch.setattr(StreamingSwitchGLU, "_hits_first", counting)
    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, ref_tokens = reference(src)
    _, logits, tokens = streamed(out, prompt, bank_experts=6)
    assert np.array_equal(logits, ref_logits) and tokens == ref_tokens
    assert calls, "no decode step had both hits and misses"
    calls.clear()
    _, _, tokens = streamed(out, prompt, bank_experts=6, hits_first=False)
    assert tokens == ref_tokens and not calls


def test_where_rows_are_not_exact_a_step_with_misses_is_computed_whole(layout, monkeypatch):
    """On CUDA at real sizes an expert's row depends on what else is in its gather_qmm call
    (``ExpertStore.rows_exact`` False): no step is split into hits and misses, presync or not,
    and every decode step's logits stay stock mlx-lm's."""
    import mlx_lm
    from flashmoe.runtime.streaming import StreamingSwitchGLU

    calls = []
    monkeypatch.setattr(StreamingSwitchGLU, "_hits_first", lambda *a: calls.append(a))
    src, out = layout("qwen3_5_moe")
    prompt, _, ref_tokens = reference(src)
    stock, _ = mlx_lm.load(str(src))
    tokens = [[t] for t in ref_tokens[:10]]
    expected = _step_logits(stock, [prompt], tokens)
    for presync in (True, False):
        model, _ = load(str(out), bank_experts=6)
        store = model.flashmoe.store
        store.rows_exact, store.presync = False, presync
        got = _step_logits(model, [prompt], tokens)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        assert store.stats.misses > 0 and not calls


def test_early_commits_are_bit_identical_and_keep_parameters(layout, monkeypatch):
    """Decoder-layer modules hand decode steps' output to MLX early (GPU default): same output,
    same parameter tree."""
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    src, out = layout("qwen3_5_moe")
    prompt, ref_logits, ref_tokens = reference(src)
    commits = []
    real = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (commits.append(a), real(*a))[1])
    counts = {}
    for early in (True, False):
        model, tok = load(str(out), bank_experts=6)
        model.flashmoe.store.eager_layers = early
        model.flashmoe.store.early_norms = early  # the norms too
        commits.clear()
        logits = np.array(model(mx.array(prompt)[None]).astype(mx.float32))
        assert np.array_equal(logits, ref_logits)
        prompt_commits = len(commits)
        tokens = [r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=8)]
        assert tokens == ref_tokens[:8]
        counts[early] = (prompt_commits, len(commits) - prompt_commits)
        if early:
            layer = model.language_model.model.layers[0]
            attn = getattr(layer, "linear_attn", None) or layer.self_attn
            assert attn.__class__ is not attn.__class__.__mro__[1]  # a committing subclass
    assert counts[True][0] == counts[False][0]  # never in a prompt
    # 7 decode steps x 4 layers x 3 modules, on top of mlx-lm's and the experts' own
    assert counts[True][1] - counts[False][1] >= 7 * 4 * 3
    stock, _ = mlx_lm.load(str(src))
    keys = {k for k, _ in tree_flatten(stock.parameters()) if "switch_mlp" not in k}
    assert {k for k, _ in tree_flatten(model.parameters())} == keys


def _step_logits(model, prompts, tokens):
    """Logits of the prompts' last position (one row per prompt, equal lengths), then of each
    step of ``tokens`` (one token per row) fed one step at a time."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    steps = [model(mx.array(prompts), cache=cache)]
    steps += [model(mx.array(step)[:, None], cache=cache) for step in tokens]
    return [np.array(s[:, -1].astype(mx.float32)) for s in steps]


def test_experts_launched_before_the_sync_are_bit_identical(layout, monkeypatch):
    """Decode steps launch their experts over the device table before the router sync (GPU
    default): the same logits at every step, whether all experts were resident or some missed,
    for one sequence and for a batch of two."""
    import mlx_lm
    from flashmoe.runtime.store import ExpertStore

    src, out = layout("qwen3_5_moe")
    prompt, _, ref_tokens = reference(src)
    stock, _ = mlx_lm.load(str(src))
    one = ([prompt], [[t] for t in ref_tokens[:12]])
    two = ([prompt[:8], prompt[8:16]], [[t, (t * 7) % 97] for t in ref_tokens[:8]])
    confirmed = []
    real = ExpertStore.confirm_resident
    monkeypatch.setattr(
        ExpertStore,
        "confirm_resident",
        lambda s, *a: confirmed.append(real(s, *a)) or confirmed[-1],
    )
    for prompts, tokens in (one, two):
        expected = _step_logits(stock, prompts, tokens)
        confirmed.clear()
        for bank in (6, 12):  # of 16
            model, _ = load(str(out), bank_experts=bank)
            model.flashmoe.store.presync = model.flashmoe.store.presync_batched = True
            got = _step_logits(model, prompts, tokens)
            assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        # both outcomes were exercised: all resident (used as launched) and some missing
        assert True in confirmed and False in confirmed, len(prompts)


def test_batched_steps_launch_before_the_sync_only_where_asked(layout, monkeypatch):
    """``presync_batched`` False (the CPU default): one sequence's decode steps launch their
    experts before the router sync, a batch's steps do not (a batched step with a miss would be
    computed again whole); True: both do."""
    from flashmoe.runtime.store import ExpertStore

    src, out = layout("qwen3_5_moe")
    prompt, _, ref_tokens = reference(src)
    launches = []
    real = ExpertStore.slots_before_sync
    monkeypatch.setattr(
        ExpertStore, "slots_before_sync", lambda s, *a: launches.append(1) or real(s, *a)
    )
    one = ([prompt], [[t] for t in ref_tokens[:4]])
    two = ([prompt[:8], prompt[8:16]], [[t, (t * 7) % 97] for t in ref_tokens[:4]])
    for batched in (False, True):
        for prompts, tokens in (one, two):
            model, _ = load(str(out), bank_experts=8)
            store = model.flashmoe.store
            store.presync, store.presync_batched = True, batched
            launches.clear()
            _step_logits(model, prompts, tokens)
            assert bool(launches) == (len(prompts) == 1 or batched), (batched, len(prompts))


@pytest.mark.parametrize("presync", [False, True])
def test_read_ahead_in_batched_decode_is_bit_identical(layout, presync):
    """A batch of rows (flashmoe-serve's batched decode) reads ahead the union of its rows'
    guesses: every step's logits are stock mlx-lm's, at banks that miss, and guesses were read."""
    import mlx_lm

    src, out = layout("qwen3_5_moe")
    prompt, _, ref_tokens = reference(src)
    stock, _ = mlx_lm.load(str(src))
    prompts = [prompt[:8], prompt[8:16], prompt[16:24]]
    tokens = [[t, (t * 7) % 97, (t * 13) % 89] for t in ref_tokens[:10]]
    expected = _step_logits(stock, prompts, tokens)
    for bank in (8, 12):  # of 16; three rows route to up to 6 experts per step
        model, _ = load(str(out), bank_experts=bank, prefetch="on")
        store = model.flashmoe.store
        store.presync = store.presync_batched = presync
        got = _step_logits(model, prompts, tokens)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), bank
        assert store.stats.prefetch_experts > 0 and store.stats.misses > 0


class _ReadsWhenWaited:
    """A batch whose reads run only when waited for: the slowest disk there is, made
    deterministic (a slot is read before its read lands unless the code waits for it)."""

    def __init__(self, requests):
        self._requests = list(requests)
        self._done = [False] * len(self._requests)

    def wait(self) -> None:
        self.wait_for(0, len(self._requests))

    def wait_for(self, start: int, stop: int) -> None:
        from flashmoe.runtime.reader import preadv_full

        for i in range(start, stop):
            if not self._done[i]:
                r = self._requests[i]
                preadv_full(r.fd, r.buffers, r.offset, r.path)
                self._done[i] = True

    def done(self) -> bool:
        return all(self._done)

    def done_for(self, start: int, stop: int) -> bool:
        return all(self._done[start:stop])


class _SlowDisk:
    """A reader (real files, real preadv) whose reads land only when waited for."""

    kind = "slow-disk"

    def submit(self, requests):
        return _ReadsWhenWaited(requests)

    def close(self) -> None:
        pass


class _ReadsAtSubmit:
    """A reader whose reads are done when ``submit`` returns (the fastest disk there is), or
    with ``every=2`` only every other one (the rest land when waited for)."""

    kind = "instant"

    def __init__(self, every: int = 1):
        self.every = every

    def submit(self, requests):
        batch = _ReadsWhenWaited(requests)
        for i in range(0, len(requests), self.every):
            batch.wait_for(i, i + 1)
        return batch

    def close(self) -> None:
        pass


@pytest.mark.parametrize("before_launch", ["waits", "launches"])
@pytest.mark.parametrize(
    "reader", ["python", pytest.param("native", marks=NATIVE_MARKS), "slow-disk"]
)
def test_read_ahead_with_experts_launched_before_the_sync(
    layout, reader, before_launch, monkeypatch
):
    """Read-ahead and presync together; the logits stay stock mlx-lm's. ``waits`` (recent
    precision at least ``_WAIT_PRECISION``): a layer waits for its guesses still landing before
    it launches its experts, so no launch sees one landing. ``launches`` (precision below it):
    the rows of guesses still landing at launch are recomputed once landed. ``slow-disk``: reads
    land only when waited for, so a row computed over a slot still being read cannot go
    unnoticed."""
    import mlx_lm
    from flashmoe.runtime import store as store_mod
    from flashmoe.runtime.store import ExpertStore

    monkeypatch.setattr(store_mod, "_WAIT_PRECISION", 0.0 if before_launch == "waits" else 2.0)

    src, out = layout("qwen3_5_moe")
    prompt, _, ref_tokens = reference(src)
    stock, _ = mlx_lm.load(str(src))
    tokens = [[t] for t in ref_tokens[:12]]
    expected = _step_logits(stock, [prompt], tokens)
    landing = []
    real = ExpertStore.slots_before_sync

    def spy(store, *a):
        launch = real(store, *a)
        landing.append(bool(launch and launch[1]))
        return launch

    confirmed = []  # (every routed expert resident, other guesses of the layer still landing)
    real_confirm = ExpertStore.confirm_resident

    def spy_confirm(store, layer, experts):
        in_flight = bool(store._in_flight(layer))
        ok = real_confirm(store, layer, experts)
        confirmed.append((ok, in_flight))
        return ok

    monkeypatch.setattr(ExpertStore, "slots_before_sync", spy)
    monkeypatch.setattr(ExpertStore, "confirm_resident", spy_confirm)
    model, _ = load(
        str(out),
        bank_experts=8,
        prefetch="on",
        reader="python" if reader == "slow-disk" else reader,
    )
    store = model.flashmoe.store
    if reader == "slow-disk":
        store.reader.close()
        store.reader = _SlowDisk()
    store.presync = True
    got = _step_logits(model, [prompt], tokens)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    store.settle_all()
    assert 0 < store.stats.prefetch_used <= store.stats.prefetch_experts
    if before_launch == "waits":
        assert True not in landing and (True, False) in confirmed
    elif reader == "slow-disk":  # real readers land most guesses before their layer launches
        assert True in landing  # guesses still landing at launch: their rows were recomputed
        # an all-hit step keeps its launched rows while unrouted guesses are still landing
        assert (True, True) in confirmed


@pytest.mark.parametrize("every", [1, 2])
def test_read_ahead_landed_before_its_layer_is_used_as_launched(layout, monkeypatch, every):
    """Guesses whose reads have finished when their layer launches its experts count as
    resident for that launch: an all-hit step that routes to them keeps the launched rows
    (no request, no recompute), and the logits stay stock mlx-lm's. ``every=2``: only every
    other guess has landed, so the others are still in flight at the launch."""
    import mlx_lm
    from flashmoe.runtime.store import ExpertStore

    src, out = layout("qwen3_5_moe")
    prompt, _, ref_tokens = reference(src)
    stock, _ = mlx_lm.load(str(src))
    tokens = [[t] for t in ref_tokens[:12]]
    expected = _step_logits(stock, [prompt], tokens)
    fast_with_guess = []  # layers whose all-hit step used a guess as launched
    real_confirm = ExpertStore.confirm_resident

    def spy(store, layer, experts):
        used = store.stats.prefetch_used
        ok = real_confirm(store, layer, experts)
        if ok and store.stats.prefetch_used > used:
            fast_with_guess.append(layer)
        return ok

    partly = []  # launches at which some guesses had landed and others were still in flight
    real_land = ExpertStore._land_if_done

    def spy_land(store, layer):
        before = store._in_flight(layer)
        real_land(store, layer)
        after = store._in_flight(layer)
        partly.append(bool(after) and after != before)

    monkeypatch.setattr(ExpertStore, "confirm_resident", spy)
    monkeypatch.setattr(ExpertStore, "_land_if_done", spy_land)
    model, _ = load(str(out), bank_experts=8, prefetch="on", reader="python")
    store = model.flashmoe.store
    store.reader.close()
    store.reader = _ReadsAtSubmit(every)
    store.presync = True
    got = _step_logits(model, [prompt], tokens)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert fast_with_guess
    assert (True in partly) == (every == 2)
    assert 0 < store.stats.prefetch_used <= store.stats.prefetch_experts


def test_a_request_submits_its_misses_before_it_waits_for_routed_guesses(layout):
    """A step routed to a guess still landing and to a true miss: the miss's reads are
    submitted first, then the guess is waited for (the two overlap instead of queueing),
    and both hold their experts' bytes when the request's wait returns."""
    from flashmoe.runtime.store import ExpertStore

    _, out = layout("qwen3_5_moe")
    model, _ = load(str(out), bank_experts=8, prefetch="on", reader="python")
    store: ExpertStore = model.flashmoe.store
    events = []

    class Logged(_ReadsWhenWaited):
        def wait_for(self, start, stop):
            events.append(("wait", self.tag))
            super().wait_for(start, stop)

    class Reader(_SlowDisk):
        def submit(self, requests):
            batch = Logged(requests)
            batch.tag = len(events)
            events.append(("submit", batch.tag))
            return batch

    store.reader.close()
    store.reader = Reader()
    layer = min(store.banks)
    store.clear_banks()
    store.prefetch(layer, [1, 2])  # guesses for the layer, still in flight
    pending = store.request(layer, [1, 3])  # 1: a routed guess, 3: a true miss
    pending.wait()
    guess_tag, miss_tag = 0, 1
    assert events.index(("submit", miss_tag)) < events.index(("wait", guess_tag)), events
    assert pending.hits == [1] and [e for e, _ in pending.misses] == [3]
    bank = store.banks[layer]
    for e in (1, 3):
        slot = int(bank.table[e])
        store._check(layer, [(e, bank.slot_buffers(slot))])  # raises on other bytes
    store.settle_all()


def test_serve_stats_report_read_ahead(layout):
    """``GET /flashmoe/stats`` (``runtime_stats``) carries the read-ahead counters that
    ``benchmarks/serve_bench.py`` turns into precision and bytes never used per level."""
    import mlx_lm
    from flashmoe.runtime.serve import runtime_stats

    src, out = layout("qwen3_5_moe")
    prompt, _, _ = reference(src)
    model, tok = load(str(out), bank_experts=8, prefetch="on")
    list(mlx_lm.stream_generate(model, tok, prompt, max_tokens=12))
    stats = runtime_stats(model.flashmoe)
    s = model.flashmoe.store.stats
    assert stats["prefetch"] == "on"
    assert stats["prefetch_experts"] == s.prefetch_experts > 0
    assert 0 < stats["prefetch_used"] <= stats["prefetch_experts"]
    assert stats["prefetch_bytes"] == s.prefetch_bytes <= stats["bytes_read"]
    assert stats["prefetch_unused_bytes"] == s.prefetch_unused_bytes <= stats["prefetch_bytes"]
