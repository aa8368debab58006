"""``flashmoe-convert --plan``: the layout a checkpoint will give, from a directory or from a Hub
repo's safetensors headers (range requests to the Hub emulator, real huggingface_hub client)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flashmoe.convert.plan import (
    RAM_SIZES_GB,
    RECORD_BYTES_PER_EXPERT,
    RECORD_BYTES_PER_FILE,
    RECORD_SLACK,
    plan_layout,
)
from flashmoe.layouts import read_index

from flashmoe.sizing import GiB, default_budget, kv_cache_bytes, slots_for_budget

REPO = "flashmoe-test/tiny-moe-checkpoint"
INDEX = "model.safetensors.index.json"


def upload_checkpoint(hub, src: Path, repo: str = REPO, private: bool = False) -> int:
    """Commit every file of ``src`` to ``repo`` on the emulator; return the shards' bytes."""
    hub.create_repo(repo, "tester", private)
    for p in sorted(src.iterdir()):
        hub.put_file(repo, p.name, p.read_bytes())
    return sum(p.stat().st_size for p in src.glob("model*.safetensors"))


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flashmoe.convert.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(env or os.environ, PYTHONWARNINGS="ignore"),
        timeout=120,
    )


def test_plan_matches_the_converted_layout(layout):
    src, out = layout("qwen3_5_moe")
    plan = plan_layout(src, progress=False)
    index = read_index(out)
    assert (plan.expert_bytes, plan.record_size) == (index.expert_bytes, index.record_size)
    assert (plan.moe_layers, plan.num_experts, plan.top_k) == (
        len(index.layers),
        index.num_experts,
        index.top_k,
    )
    assert {e.size for e in index.layers} == {plan.layer_file_bytes}
    assert plan.dense_bytes == index.dense.size
    written = (
        sum(e.size for e in index.layers) + index.dense.size + sum(f.size for f in index.files)
    )
    assert plan.layout_bytes == written
    sizes = {p.name: p.stat().st_size for p in src.glob("model*.safetensors")}
    # a streamed conversion holds two shards at once (a layer spanning shards is written a
    # shard at a time), and keeps the small files in the Hub cache and its records
    two = sum(sorted(sizes.values())[-2:])
    assert plan.largest_shards_bytes == two
    small = sum(p.stat().st_size for p in src.iterdir() if not p.name.endswith(".safetensors"))
    files = len(list(src.iterdir()))
    records = len(index.layers) * index.num_experts * RECORD_BYTES_PER_EXPERT
    records += files * RECORD_BYTES_PER_FILE + RECORD_SLACK  # an estimate: the peak test checks it
    assert plan.kept_files_bytes == small + records
    assert plan.disk_streaming == written + two + small + records
    assert plan.disk_full_download == plan.source_bytes + written
    # the runtime's own sizing rule, for every listed RAM size
    assert [r.ram_bytes for r in plan.memory[1:]] == [n * GiB for n in RAM_SIZES_GB]
    assert plan.memory[0].this_machine
    kv = kv_cache_bytes(index.config.get("text_config", index.config), 8192)
    for row in plan.memory:
        slots = slots_for_budget(
            default_budget(row.ram_bytes),
            dense_bytes=index.dense.size,
            kv_bytes=kv,
            expert_bytes=index.expert_bytes,
            moe_layers=len(index.layers),
            num_experts=index.num_experts,
            min_slots=index.top_k,
        )
        assert row.bank_experts == slots


def test_plan_from_hub_headers_only(hub, checkpoint, tmp_path):
    src = checkpoint("qwen3_5_moe")
    upload_checkpoint(hub, src)
    local = plan_layout(src, progress=False)
    hub.requests.clear()
    r = cli("--plan", REPO, "--json", env=hub.env)
    assert r.returncode == 0, r.stderr
    remote = json.loads(r.stdout)
    for key in ("expert_bytes", "record_size", "layer_file_bytes", "dense_bytes", "moe_layers"):
        assert remote[key] == getattr(local, key), key
    for key in ("layout_bytes", "source_bytes", "disk_streaming", "disk_full_download"):
        assert remote[key] == getattr(local, key), key
    assert "routing locality" in remote["unknowns"]
    # no shard was downloaded: every GET of a shard was a range request for its header
    shard_gets = [p for m, p in hub.requests if m == "GET" and ".safetensors" in p]
    assert shard_gets and not list(Path(os.environ["HF_HUB_CACHE"]).rglob("model-0*.safetensors"))
    r = cli("--plan", REPO, env=hub.env)
    assert r.returncode == 0 and "disk needed" in r.stdout and "this machine" in r.stdout


def test_plan_bad_input_is_one_line(hub, tmp_path, capsys, monkeypatch):
    from flashmoe.convert.cli import main

    hub.create_repo("flashmoe-test/empty", "flashmoe-test", False)
    cases = [
        ("flashmoe-test/nothing-here", "repository not found"),
        ("flashmoe-test/empty", "not a safetensors checkpoint"),
        (str(tmp_path / "nope"), "no such directory"),
        (str(tmp_path), "config.json: missing"),
    ]
    for src, needle in cases:
        assert main(["--plan", src]) == 2, src
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (src, lines)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["--plan", "flashmoe-test/x"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "offline" in lines[0], lines


def test_plan_of_a_100_shard_repo(hub, tmp_path):
    """A 100-shard repo (Qwen3.5-35B-A3B expert geometry, 61 layers, 29 GB) whose shards are
    their real headers and holes (``put_sparse_file``): the plan reads only headers (range
    requests; nothing downloaded) and its numbers are the ones the headers give."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import convert_bench as bench

    src, repo = tmp_path / "src", "flashmoe-test/hundred-shards"
    layers = 61
    bench.write_checkpoint(src, layers, bench.shard_bytes_for(layers, 100), sparse=True)
    bench.put_sparse_checkpoint(hub, repo, src)
    plan = plan_layout(repo, progress=False)

    sizes = {p.name: p.stat().st_size for p in src.glob("*.safetensors")}
    assert len(sizes) == plan.shards == 100
    tensors = {}  # name -> (shape, data_offsets), from the headers
    for name in sizes:
        with open(src / name, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        tensors.update({k: (v["shape"], v["data_offsets"]) for k, v in header.items()})
    experts: dict[int, int] = {}  # layer -> its experts' bytes
    for key, (shape, (start, end)) in tensors.items():
        if ".mlp.switch_mlp." in key:
            layer = int(key.split(".layers.")[1].split(".")[0])
            experts[layer] = experts.get(layer, 0) + end - start
            assert shape[0] == bench.EXPERTS
    expert_bytes = experts[0] // bench.EXPERTS
    assert set(experts.values()) == {expert_bytes * bench.EXPERTS} and len(experts) == layers
    record = -(-expert_bytes // 16384) * 16384
    assert (plan.moe_layers, plan.num_experts, plan.top_k) == (layers, bench.EXPERTS, bench.TOP_K)
    assert (plan.expert_bytes, plan.record_size) == (expert_bytes, record)
    assert plan.layer_file_bytes == bench.EXPERTS * record
    dense = sum(e - s for k, (_, (s, e)) in tensors.items() if ".switch_mlp." not in k)
    dense_tensors = len(tensors) - 9 * layers  # + the dense file's header: a line per tensor
    assert dense < plan.dense_bytes < dense + 8 + 200 * dense_tensors
    aux = sum(p.stat().st_size for p in src.iterdir() if p.name.endswith("config.json"))
    assert plan.layout_bytes == layers * bench.EXPERTS * record + plan.dense_bytes + aux
    assert plan.source_bytes == sum(sizes.values()) + aux
    two = sum(sorted(sizes.values())[-2:])
    assert plan.largest_shards_bytes == two
    assert plan.disk_streaming == plan.layout_bytes + two + plan.kept_files_bytes
    assert plan.disk_full_download == plan.source_bytes + plan.layout_bytes
    assert set(hub.bytes_served) == {"config.json", INDEX}  # headers only: no shard downloaded
