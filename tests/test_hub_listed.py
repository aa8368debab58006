"""flashmoe-pull fetches and trusts only what the index lists and checksums (local Hub emulator)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from flashmoe.layouts import INDEX_FILE, LayoutError
from flashmoe.runtime.hub import is_verified, pull
from test_hub import _put_layout

from flashmoe.hubio import HubError

REPO = "flashmoe-test/listed"


@pytest.fixture
def tiny_layout(layout, tmp_path) -> Path:
    _, src = layout("qwen3_5_moe")
    dst = tmp_path / "layout"
    shutil.copytree(src, dst)
    return dst


def put_layout(hub, layout_dir: Path, extra=(), index: dict | None = None) -> None:
    _put_layout(hub, layout_dir, REPO, index=index, extra=extra)


def test_pull_fetches_only_listed_files(hub, tiny_layout):
    unlisted = [
        ("chat_template.jinja", b"{{ 'every prompt changed' }}"),
        ("special_tokens_map.json", b"{}"),
        ("big.json", b" " * 3_000_000),
        ("experts/layer-999.bin", b"\0" * 5000),
        ("merges.txt", b"a b\n"),
    ]
    put_layout(hub, tiny_layout, extra=unlisted)
    root = pull(REPO, progress=False)
    listed = {INDEX_FILE, "model-dense.safetensors"}
    index = json.loads((root / INDEX_FILE).read_text())
    listed |= {e["file"] for e in index["layers"]} | {f["name"] for f in index["files"]}
    got = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert got == listed  # no README, no unlisted template, no 3 MB file
    assert is_verified(root)


def test_pull_refuses_an_index_listing_a_file_without_checksum(hub, tiny_layout):
    """[R18]"""
    index = json.loads((tiny_layout / INDEX_FILE).read_text())
    index["files"][0]["sha256"] = None
    put_layout(hub, tiny_layout, index=index)
    name = index["files"][0]["name"]
    with pytest.raises(HubError, match=f"lists {name} without a sha256"):
        pull(REPO, progress=False)


@pytest.mark.parametrize("victim", ["experts/layer-001.bin", "model-dense.safetensors"])
def test_bytes_flipped_in_place_with_mtime_kept_are_caught(hub, tiny_layout, victim):
    put_layout(hub, tiny_layout)
    root = pull(REPO, progress=False)
    assert is_verified(root)
    blob = Path(os.path.realpath(root / victim))
    st = blob.stat()
    os.chmod(blob, 0o644)  # the cache's blobs may be read-only
    with open(blob, "r+b") as f:
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 1]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert not is_verified(root)
    with pytest.raises(LayoutError, match="sha256 mismatch"):
        pull(REPO, progress=False)


def test_two_pulls_into_one_cache_at_once(hub, tiny_layout):
    import subprocess
    import sys

    put_layout(hub, tiny_layout)
    cmd = [sys.executable, "-m", "flashmoe.runtime.hub", REPO, "--quiet"]
    env = dict(hub.env, PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    roots = {out.strip() for out, _ in results}
    assert len(roots) == 1
    assert is_verified(Path(roots.pop()))
