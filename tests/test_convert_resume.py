"""flashmoe-convert killed with SIGKILL and rerun gives the same bytes as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flashmoe.convert import ConvertError, convert_checkpoint
from flashmoe.convert.writers import SLOW_ENV
from flashmoe.layouts import INDEX_FILE, LayoutError

from flashmoe.verify import verify_layout

DONE = ".flashmoe-convert/done"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def start_slow(src: Path, out: Path) -> subprocess.Popen:
    """The CLI, one file at a time and sleeping after every expert, so that it can be killed mid-layer."""
    env = dict(os.environ, **{SLOW_ENV: "0.03"})
    cmd = [
        sys.executable,
        "-m",
        "flashmoe.convert.cli",
        str(src),
        "-o",
        str(out),
        "--workers",
        "1",
        "--quiet",
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "conversion did not reach the kill point"
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("finished_layers", [0, 2])
def test_resume_after_sigkill_mid_layer(layout, tmp_path, finished_layers):
    src, reference = layout("qwen3_moe")
    out = tmp_path / "out"
    proc = start_slow(src, out)
    partial = out / "experts" / f"layer-{finished_layers:03d}.bin.partial"

    def mid_layer() -> bool:
        # Some experts of this layer are written (the sleep comes after each expert), not all.
        return (
            len(list((out / DONE).glob("experts__*"))) == finished_layers
            and partial.exists()
            and any(partial.read_bytes()[:4096])
        )

    try:
        wait_for(mid_layer, proc)
    finally:
        kill(proc)
    assert not (out / INDEX_FILE).exists() and partial.exists()
    with pytest.raises(LayoutError, match="missing"):
        verify_layout(out)
    finished = {
        p: (out / p).stat().st_ino
        for p in (f"experts/layer-{i:03d}.bin" for i in range(finished_layers))
    }

    index = convert_checkpoint(src, out, progress=False)  # the same conversion, rerun
    assert tree_bytes(out) == tree_bytes(reference)
    assert verify_layout(out) == index
    for p, ino in finished.items():  # finished layers were kept, not redone
        assert (out / p).stat().st_ino == ino


def test_interrupted_conversion_is_not_mixed_with_another(layout, checkpoint, tmp_path):
    src, reference = layout("qwen3_moe")
    out = tmp_path / "out"
    proc = start_slow(src, out)
    try:
        wait_for(lambda: (out / "experts" / "layer-000.bin.partial").exists(), proc)
    finally:
        kill(proc)
    for other in [
        lambda: convert_checkpoint(src, out, alignment=4096, progress=False),
        lambda: convert_checkpoint(checkpoint("qwen3_next"), out, progress=False),
    ]:
        with pytest.raises(
            ConvertError,
            match="holds an unfinished conversion of a different source or with different options",
        ):
            other()
    assert not (out / INDEX_FILE).exists()
    convert_checkpoint(src, out, progress=False, verify=True)
    assert tree_bytes(out) == tree_bytes(reference)


def test_resume_redoes_a_finished_file_that_was_damaged(layout, tmp_path):
    src, reference = layout("qwen3_moe")
    out = tmp_path / "out"
    proc = start_slow(src, out)
    try:
        wait_for(lambda: (out / DONE / "experts__layer-001.bin.json").exists(), proc)
    finally:
        kill(proc)
    os.truncate(out / "experts" / "layer-000.bin", 1000)  # e.g. a copy that went wrong
    convert_checkpoint(src, out, progress=False)
    assert tree_bytes(out) == tree_bytes(reference)
