"""``flashmoe-convert ORG/NAME``: shard by shard from the Hub emulator (real huggingface_hub
client), with bounded disk, resumable, byte-identical to converting a full download."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flashmoe.convert import ConvertError, convert_checkpoint
from flashmoe.convert.plan import plan_layout
from flashmoe.layouts import INDEX_FILE
from test_convert_plan import upload_checkpoint

REPO = "flashmoe-test/tiny-moe-checkpoint"
# shards of 400 kB: every layer's experts (442 kB) span two of them (as half the layers of
# mlx-community's Qwen3.5-397B do)
SHARD_BYTES = 400_000


def recounted(count):
    """``count()``, taken again while a file vanishes under it: a converter running beside it
    deletes files, and a count is taken between two deletions."""
    while True:
        try:
            return count()
        except FileNotFoundError:
            continue


def disk_bytes(*roots: Path) -> int:
    """Bytes of the files under ``roots`` (``recounted``)."""
    return recounted(
        lambda: sum(
            p.stat().st_size
            for r in roots
            if r.exists()
            for p in r.rglob("*")
            if p.is_file() and not p.is_symlink()
        )
    )


def held_blobs(cache: Path, sizes: set[int]) -> int:
    """Shards held in the Hub cache: blobs of a shard's size, and downloads under way."""
    blobs = [p for p in cache.rglob("blobs/*") if p.stat().st_size in sizes]
    return len(blobs) + len(list(cache.rglob("*.incomplete")))


def layout_files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name not in (INDEX_FILE, "README.md", ".flashmoe-convert.lock")
    }


def comparable_index(out: Path) -> dict:
    index = json.loads((out / INDEX_FILE).read_text())
    for f in index["source"]["files"]:
        f.pop("mtime_ns")
    index["source"].pop("path")
    return index


@pytest.fixture
def hub_checkpoint(hub, checkpoint):
    src = checkpoint("qwen3_5_moe", shard_bytes=SHARD_BYTES)
    upload_checkpoint(hub, src)
    shards = {p.name: p.stat().st_size for p in src.glob("model*.safetensors")}
    return src, shards


def test_streamed_conversion_is_identical_with_bounded_disk(hub, hub_checkpoint, tmp_path):
    from huggingface_hub import snapshot_download

    src, shards = hub_checkpoint
    cache = Path(os.environ["HF_HUB_CACHE"])
    out = tmp_path / "streamed"
    peaks, held, sizes = [], [], set(shards.values())

    def on_request(method: str, path: str, headers) -> None:
        name = path.rsplit("/", 1)[-1]
        if method == "GET" and name in shards and "Range" not in headers:
            # at the start of a shard's download: what is held, plus the shard itself (an
            # exception here would drop the download and make the client fetch it again)
            peaks.append(disk_bytes(cache, out) + shards[name])
            held.append(recounted(lambda: held_blobs(cache, sizes)))

    hub.on_request = on_request
    index = convert_checkpoint(REPO, out, progress=False, verify=True)
    hub.on_request = None
    assert len(peaks) == len(shards)  # each shard fetched once
    # huggingface_hub creates the starting shard's .incomplete file first: it counts, too
    assert max(held) <= 2, held
    assert not list(cache.rglob("model-*.safetensors")), "shards not released"
    layout = sum(e.size for e in index.layers) + index.dense.size + sum(f.size for f in index.files)
    two = sum(sorted(shards.values())[-2:])
    small = disk_bytes(cache)  # what stays in the Hub cache: config, tokenizer, weight index
    assert max(peaks) <= layout + two + small, (max(peaks), layout, two, small)
    # what --plan says a streamed conversion needs (headers only) is what it held
    plan = plan_layout(REPO, progress=False)
    assert plan.largest_shards_bytes == two and plan.layout_bytes == layout
    assert max(peaks) <= plan.disk_streaming, (max(peaks), plan.disk_streaming)
    assert max(peaks) < layout + sum(shards.values())  # less than the whole checkpoint

    # layers whose experts span two shards were written a shard at a time
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    spans = {}
    for key, shard in weight_map.items():
        if ".switch_mlp." in key:
            spans.setdefault(key.split(".mlp.")[0], set()).add(shard)
    assert {len(s) for s in spans.values()} == {2}, spans
    full = Path(snapshot_download(REPO))
    ref = tmp_path / "reference"
    convert_checkpoint(full, ref, progress=False)
    assert layout_files(out) == layout_files(ref)
    assert comparable_index(out) == comparable_index(ref)
    assert (out / "README.md").read_text() == (ref / "README.md").read_text()


def test_interrupted_streamed_conversion_resumes(hub, hub_checkpoint, tmp_path):
    src, shards = hub_checkpoint
    names = sorted(shards)
    out = tmp_path / "out"
    # the third shard cannot be fetched: the run fails after finishing what it could
    hub.missing_files.add(names[2])
    ranges = []
    hub.on_request = lambda m, p, h: ranges.append((m, p.rsplit("/", 1)[-1], h.get("Range")))
    with pytest.raises(ConvertError, match=names[2].replace(".", r"\.")):
        convert_checkpoint(REPO, out, progress=False)
    finished = sorted(p.name for p in (out / "experts").glob("layer-*.bin"))
    assert finished, "nothing kept from the interrupted run"

    hub.missing_files.clear()
    ranges.clear()
    index = convert_checkpoint(REPO, out, progress=False)
    fetched = {p for m, p, r in ranges if m == "GET" and r is None and p in shards}
    assert names[0] not in fetched and names[2] in fetched  # only what was still needed
    assert len(index.layers) == 4 and not (out / ".flashmoe-convert").exists()
    ref = tmp_path / "reference"
    convert_checkpoint(src, ref, progress=False)
    assert layout_files(out) == layout_files(ref)


def convert_cli(hub, out: Path, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flashmoe.convert.cli", REPO, "-o", str(out), "--quiet"]
    env = dict(hub.env, PYTHONWARNINGS="ignore")
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen
    )


def test_killed_mid_shard_resumes_and_survives_a_dropped_connection(
    hub, hub_checkpoint, layout, tmp_path
):
    """SIGKILL while a shard downloads, then a rerun whose download drops once: the rerun fetches
    only the shards still needed (the half-fetched one again: huggingface_hub 2.x does not resume
    across processes) and deletes the killed download's leftover, retries the dropped download,
    exits 0 with the local conversion's bytes; no index (the completion mark) before the end."""
    _, shards = hub_checkpoint
    names = sorted(shards)
    cache, out = Path(os.environ["HF_HUB_CACHE"]), tmp_path / "out"
    pause = hub.pause_download(names[1], shards[names[1]] // 2)
    proc = convert_cli(hub, out)
    try:
        assert pause.reached.wait(60), proc.stderr.read().decode() if proc.poll() else "no fetch"
        # meanwhile the first shard is repacked, layer 0's part of it included, and released
        done = out / ".flashmoe-convert" / "done"
        deadline = time.monotonic() + 30
        while list(cache.rglob(names[0])) or not list(done.glob("part--experts__layer-000*")):
            assert time.monotonic() < deadline and proc.poll() is None, "shard 0 not repacked"
            time.sleep(0.01)
        assert not (out / "experts" / "layer-000.bin").exists()
        assert not (out / INDEX_FILE).exists()
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        pause.drop = True
        pause.release.set()
        proc.kill()
        proc.wait()
    assert len(list(cache.rglob("*.incomplete"))) == 1  # the killed download's leftover
    before = dict(hub.bytes_served)
    assert before[names[0]] == shards[names[0]] and before[names[1]] == shards[names[1]] // 2
    assert names[2] not in before

    hub.cut_downloads[names[2]] = 100_000  # the connection drops mid-body once
    complete_early = []

    def on_request(method: str, path: str, headers) -> None:
        if path.rsplit("/", 1)[-1] in shards:
            complete_early.append((out / INDEX_FILE).exists())

    hub.on_request = on_request
    rerun = convert_cli(hub, out)
    assert rerun.wait(60) == 0, rerun.stderr.read().decode()
    hub.on_request = None
    served = {k: v - before.get(k, 0) for k, v in hub.bytes_served.items() if v > before.get(k, 0)}
    assert names[0] not in served  # layer 0's part of it was kept
    assert served[names[1]] == shards[names[1]]
    # huggingface_hub retried the dropped download within the run
    assert served[names[2]] <= shards[names[2]] + 100_000
    assert set(served) == set(names[1:]) and not hub.cut_downloads
    assert complete_early and not any(complete_early)
    assert not list(cache.rglob("model-*.safetensors")) and not list(cache.rglob("*.incomplete"))
    _, reference = layout("qwen3_5_moe", shard_bytes=SHARD_BYTES)
    assert layout_files(out) == layout_files(reference)
    index, ref_index = comparable_index(out), comparable_index(reference)
    assert index.pop("source")["repo_id"] == REPO and ref_index.pop("source")
    assert index == ref_index


def test_keep_source_private_repo_and_offline(hub, checkpoint, tmp_path, monkeypatch):
    from huggingface_hub import constants

    src = checkpoint("qwen3_5_moe", shard_bytes=SHARD_BYTES)
    private = "flashmoe-test/private-moe"
    upload_checkpoint(hub, src, private, private=True)
    convert_checkpoint(private, tmp_path / "a", progress=False, keep_source=True)
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert len(list(cache.rglob("model-*.safetensors"))) == len(list(src.glob("model-*")))
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ConvertError, match="repository not found"):
        convert_checkpoint(private, tmp_path / "b", progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConvertError) as e:
        convert_checkpoint("flashmoe-test/never-seen", tmp_path / "c", progress=False)
    assert "\n" not in str(e.value) and "offline" in str(e.value).lower()


def test_not_enough_space_is_refused_before_fetching(hub, hub_checkpoint, tmpfs):
    _, shards = hub_checkpoint
    small = tmpfs("1m")
    fetched = []
    hub.on_request = lambda m, p, h: fetched.append(p) if "Range" not in h else None
    with pytest.raises(ConvertError, match="not enough free space"):
        convert_checkpoint(REPO, small / "out", progress=False)
    assert not [p for p in fetched if p.rsplit("/", 1)[-1] in shards]
