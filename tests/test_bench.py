"""flashmoe-bench synth/sweep/runtime/ppl on tiny models: they run, write valid JSON, print tables.

Speed is never asserted: these machines are shared and MLX CPU is slow.
"""

from __future__ import annotations

import json

import pytest
from flashmoe.bench.cli import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_presets_have_the_real_geometry():
    """Nothing is evaluated: mlx-lm's model is built lazily to get names, shapes and the config."""
    import mlx.core as mx
    from flashmoe.bench.synth import _plan, preset_config

    tensors, qconfig, _ = _plan(preset_config("qwen3.5-397b", 2, 8192), mx.bfloat16)
    shapes = {t.name: (t.shape, t.dtype) for t in tensors}
    p = "language_model.model.layers.0.mlp.switch_mlp"
    assert shapes[f"{p}.gate_proj.weight"] == ((512, 1024, 512), mx.uint32)
    assert shapes[f"{p}.gate_proj.scales"] == ((512, 1024, 64), mx.bfloat16)
    assert shapes[f"{p}.down_proj.weight"] == ((512, 4096, 128), mx.uint32)
    per_expert = sum(
        t.nbytes for t in tensors if t.name.startswith(f"{p}.") and ".switch_mlp." in t.name
    )
    assert per_expert // 512 == 7_077_888  # shared/reference.md
    q = qconfig["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64
    assert q["language_model.model.layers.1.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert q["language_model.model.layers.1.mlp.shared_expert_gate"]["bits"] == 8
    assert qconfig["quantization_config"] == q
    tc = preset_config("qwen3.5-35b", 4)["text_config"]
    assert (tc["hidden_size"], tc["num_experts"], tc["moe_intermediate_size"]) == (2048, 256, 512)
    assert tc["layer_types"][3] == "full_attention" and tc["vocab_size"] == 248320


@pytest.fixture
def tiny_preset(monkeypatch):
    from flashmoe.bench import synth

    # hidden, heads, kv heads, experts, top-k, moe I, shared I, GDN key heads, value heads, layers
    monkeypatch.setitem(synth.GEOMETRY, "tiny", (128, 2, 1, 8, 2, 64, 64, 1, 2, 4))
    return "tiny"


def test_synth_writes_an_mlx_lm_checkpoint_and_converts_it(tmp_path, capsys, tiny_preset):
    import mlx.core as mx
    import mlx_lm

    out = tmp_path / "ckpt"
    rc, stdout, err = _run(
        capsys, "synth", "--preset", tiny_preset, "--layers", 2, "--vocab", 1024, "-o", out,
        "--shard-gb", 0.0002, "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    assert "logits are finite" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["layer_types"] == ["linear_attention", "full_attention"]
    assert "language_model.model.layers.0.mlp.gate" in config["quantization"]
    model, tok = mlx_lm.load(str(out))
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 1024)
    layout = tmp_path / "ckpt.layout"
    assert (layout / "flashmoe-index.json").exists()
    assert (layout / "experts" / "layer-001.bin").exists()


def test_synth_errors_are_one_line(tmp_path, capsys):
    rc, _, err = _run(capsys, "synth", "--preset", "qwen3.5-35b", "--layers", 0, "-o", tmp_path)
    assert rc == 2 and err.strip() == "flashmoe-bench: error: --layers must be >= 1"


def test_sweep_cold_and_warm_with_mlx_lm(tmp_path, capsys, layout):
    src, lay = layout()
    out = tmp_path / "sweep.json"
    rc, stdout, err = _run(
        capsys, "sweep", lay, "--source", src, "--splits", "4", "--tokens", 4, "--both",
        "--bank-experts", 8, "--json", out,
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 and {r["mode"] for r in data["rows"]} == {"cold", "warm"}
    for col in ("cache-io-split", "tok/s", "expert I/O ms/token", "hit rate", "MB read/token"):
        assert col in stdout
    for col in ("TTFT ms", "prompt tok/s", "disk MB/token (device)"):
        assert col in stdout
    row = data["rows"][0]
    assert row["bank_experts"] == 8 and row["decode_tps"] > 0 and 0 <= row["hit_rate"] <= 1
    assert data["tokens_identical_to_mlx_lm"] is True
    assert [b["mode"] for b in data["mlx_lm"]] == ["cold", "warm"]
    m = data["machine"]
    assert m["page_size"] > 0 and m["cpu"]["model"] and m["versions"]["mlx-lm"]
    assert m["disk"]["device"] and m["backend"]["device"]
    assert "mlx-lm" in stdout and "JSON:" in stdout


def test_sweep_under_a_memory_cap(tmp_path, capsys, layout):
    from flashmoe.bench.cgroup import CgroupError, check_available

    try:
        check_available()
    except CgroupError as e:
        pytest.skip(str(e))
    src, lay = layout()
    out = tmp_path / "cap.json"
    rc, stdout, err = _run(
        capsys, "sweep", lay, "--source", src, "--splits", 2, "--tokens", 3,
        "--memory-cap", 2, "--bank-experts", 4, "--json", out,
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["memory_cap_bytes"] == 2 << 30
    assert data["rows"][0]["mode"] == "cold" and data["rows"][0]["cgroup_peak_mb"] > 0
    assert data["runs"][0]["cgroup"]["limit_bytes"] == 2 << 30
    assert "only" in " ".join(data["notes"])  # the tiny layout is not 3x the cap


def test_memory_cap_without_cgroups_is_a_clear_error(tmp_path, capsys, layout, monkeypatch):
    from flashmoe.bench import cgroup

    monkeypatch.setattr(cgroup, "V1_ROOT", tmp_path / "none")
    monkeypatch.setattr(cgroup, "V2_ROOT", tmp_path / "none")
    _, lay = layout()
    rc, _, err = _run(capsys, "sweep", lay, "--memory-cap", 1, "--no-mlx-lm")
    assert rc == 2
    assert err.startswith("flashmoe-bench: error: --memory-cap: no memory cgroup")
    assert len(err.strip().splitlines()) == 1


def test_runtime_benchmark(tmp_path, capsys, layout):
    src, lay = layout()
    out = tmp_path / "runtime.json"
    rc, stdout, err = _run(
        capsys, "runtime", lay, "--source", src, "--tokens", 4, "--repeat", 1, "--json", out
    )
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["ratio_full_bank_vs_mlx_lm"] > 0 and data["tokens_identical"] is True
    assert data["budget_slots_chosen"] == data["budget_slots_expected"] == 4  # 25% of 16
    assert data["flashmoe_full"][0]["decode"]["hit_rate"] == 1.0  # warm-up filled the bank
    for col in ("tok/s (median)", "hit rate", "MB read/token", "expert I/O ms/token", "budget MB"):
        assert col in stdout
    assert "peak RSS" in stdout


def test_ppl_agrees_with_mlx_lm_and_prunes(tmp_path, capsys, layout):
    src, lay = layout()
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    out = tmp_path / "ppl.json"
    rc, stdout, err = _run(
        capsys, "ppl", lay, "--source", src, "--text", text, "--k", 2, "--window", 8,
        "--bank-experts", 8, "--json", out,
    )  # fmt: skip
    assert rc == 0, err
    data = json.loads(out.read_text())
    assert data["identical"] is True
    full, pruned = data["flashmoe"]["runs"]
    assert full["k"] is None and pruned["k"] == 2
    assert full["ppl"] > 1 and 0 <= pruned["top1_agreement_vs_first"] <= 1
    assert pruned["kl_vs_first"] >= 0
    for col in ("PPL flashmoe", "PPL mlx-lm", "identical", "KL vs full k"):
        assert col in stdout


def test_not_a_layout(capsys, tmp_path):
    for sub in ("sweep", "runtime"):
        rc, _, err = _run(capsys, sub, tmp_path)
        assert rc == 2 and "not a flashmoe layout" in err and len(err.splitlines()) == 1
    rc, _, err = _run(capsys, "ppl", tmp_path, "--text", tmp_path / "x")
    assert rc == 2 and err.startswith("flashmoe-bench: error:")


def test_pagecache_drop_and_residency(tmp_path):
    from flashmoe.bench import pagecache

    f = tmp_path / "data.bin"
    f.write_bytes(b"x" * (1 << 20))
    assert 0.0 <= pagecache.warm([f]) <= 1.0
    assert pagecache.drop([f]) < 0.5
    assert pagecache.resident_bytes(f)[1] == 1 << 20


def test_synth_is_deterministic(tmp_path, tiny_preset):
    from flashmoe.bench.synth import synthesize

    a = synthesize(tmp_path / "a", tiny_preset, 4, vocab=512, progress=False)
    b = synthesize(tmp_path / "b", tiny_preset, 4, vocab=512, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = synthesize(tmp_path / "c", tiny_preset, 4, vocab=512, seed=1, progress=False)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_gpu_summary_pairs_alternating_rows_in_order():
    from flashmoe.bench.gpu_bench import summarize

    def row(eager, tok_s, bank=128):
        return {"bank": bank, "split": 4, "pages": "warm", "mode": "staged", "prefetch": "off",
                "hits_first": True, "eager": eager, "policy": "lfu", "tok_s": tok_s}  # fmt: skip

    rows = [row("presync", 200.0), row("on", 100.0), row("presync", 100.0), row("on", 200.0),
            row("presync", 50.0, bank=10)]  # fmt: skip
    first, second, other = summarize(rows)
    assert (first["configuration"], first["rows"], first["median_tok_s"]) == (
        "off/hf/presync/lfu", 2, 150.0)  # fmt: skip
    assert "pair_ratio" not in first and "pair_ratio" not in other  # nothing to pair with
    # pairs (100 vs 200) and (200 vs 100): ratios 0.5 and 2, geometric mean 1, one pair won
    assert second["vs"] == "off/hf/presync/lfu" and second["configuration"] == "off/hf/eager/lfu"
    assert abs(second["pair_ratio"] - 1.0) < 1e-12 and (second["pairs_won"], second["pairs"]) == (
        1,
        2,
    )
    assert other["bank"] == 10 and other["rows"] == 1


def test_gpu_rows_say_hits_first_only_where_it_acts():
    """On CUDA at real sizes hits first is asked for but a step with misses is computed whole:
    such a row is labelled '-', not 'hf' (rows written before the field keep their setting)."""
    from flashmoe.bench.gpu_bench import _config_label

    row = {"prefetch": "auto", "hits_first": True, "eager": "presync", "policy": "lfu"}
    assert _config_label(dict(row, hits_first_effective=False)) == "auto/-/presync/lfu"
    assert _config_label(dict(row, hits_first_effective=True)) == "auto/hf/presync/lfu"
    assert _config_label(row) == "auto/hf/presync/lfu"


def test_a_worker_past_its_timeout_is_a_clear_error(tmp_path):
    """A measurement that runs too long (e.g. MLX compiling its kernels on a fresh GPU machine)
    is killed and reported in one line, not as a crash of the bench."""
    from flashmoe.bench.measure import run_worker

    spec = {"engine": "mlx-lm", "path": str(tmp_path), "prompt": "x", "max_tokens": 1}
    r = run_worker(spec, timeout=0.2)
    assert r["timed_out"] and r["wall_seconds"] < 30
    assert r["error"].startswith("timed out after 0.2 s (--timeout;") and "\n" not in r["error"]


def test_spread_sampler_varies_the_tokens_and_follows_the_logits():
    """The gpu bench's decoded tokens: greedy plus a seeded offset, the same stream for the same
    logits (so stock mlx-lm and flashmoe can be compared token for token)."""
    import mlx.core as mx
    from flashmoe.bench.gpu_bench import spread_sampler

    logits = mx.zeros((1, 100)).at[0, 7].add(1.0)
    a, b = spread_sampler(), spread_sampler()
    first = [int(a(logits).item()) for _ in range(8)]
    assert first == [int(b(logits).item()) for _ in range(8)]
    assert len(set(first)) > 4  # not one repeated token
    other = mx.zeros((1, 100)).at[0, 8].add(1.0)
    c = spread_sampler()
    assert [(int(c(other).item()) - 1) % 100 for _ in range(8)] == first
