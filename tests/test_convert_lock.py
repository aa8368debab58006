"""Two conversions into one folder, "already converted" that checks, and refusals that leave no state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flashmoe.convert import ConvertError, convert_checkpoint
from flashmoe.convert.lock import LOCK_FILE
from flashmoe.convert.writers import SLOW_ENV
from flashmoe.layouts import INDEX_FILE, read_index

from flashmoe.verify import verify_layout


def convert_cli(src: Path, out: Path, *extra: str, slow: bool = False) -> subprocess.Popen:
    env = dict(os.environ, **({SLOW_ENV: "0.1"} if slow else {}))  # 6.4 s for the 64 experts
    cmd = [sys.executable, "-m", "flashmoe.convert.cli", str(src), "-o", str(out), "--quiet"]
    return subprocess.Popen(
        [*cmd, *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_until(predicate, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_second_conversion_into_the_same_folder_is_refused(layout, tmp_path):
    src, reference = layout("qwen3_moe")
    out = tmp_path / "out"
    first = convert_cli(src, out, "--workers", "1", slow=True)
    try:
        wait_until(lambda: (out / "experts" / "layer-000.bin.partial").exists(), first)
        for extra in ([], ["--alignment", "4096"]):  # the same conversion, or another
            second = convert_cli(src, out, *extra)
            _, err = second.communicate(timeout=60)
            assert second.returncode == 2
            assert err == (
                f"flashmoe-convert: error: {out}: another flashmoe-convert is writing into this "
                f"folder (it holds {LOCK_FILE}); wait for it to finish or choose another output "
                "directory\n"
            )
        assert first.wait(timeout=60) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert tree_bytes(out) == tree_bytes(reference)  # no lock file left, every byte right
    verify_layout(out)


def test_lock_of_a_killed_conversion_does_not_block_a_rerun(layout, tmp_path):
    src, reference = layout("qwen3_moe")
    out = tmp_path / "out"
    first = convert_cli(src, out, "--workers", "1", slow=True)
    try:
        wait_until(lambda: (out / "experts" / "layer-000.bin.partial").exists(), first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_FILE).exists()  # left behind, but no longer locked
    convert_checkpoint(src, out, progress=False)
    assert tree_bytes(out) == tree_bytes(reference)


def test_already_converted_checks_records_and_copied_files(checkpoint, tmp_path, capsys):
    src = checkpoint("qwen3_moe")
    out = tmp_path / "out"
    convert_checkpoint(src, out, progress=False)
    index = read_index(out)
    convert_checkpoint(src, out)
    err = capsys.readouterr().err
    assert err == (
        f"{out}: already converted "
        "(sizes, copied files' sha256 and 3 expert records per layer checked)\n"
    )
    layer = out / index.layers[-1].file
    saved = layer.read_bytes()
    last = (index.num_experts - 1) * index.record_size
    with open(layer, "r+b") as f:  # zeroed, same size: what a second writer did before the lock
        f.seek(last)
        f.write(bytes(index.expert_bytes))
    with pytest.raises(ConvertError, match=f"that is damaged .*{layer.name}: layer .* expert 15"):
        convert_checkpoint(src, out, progress=False)
    layer.write_bytes(saved)
    template = out / "config.json"
    raw = bytearray(template.read_bytes())
    raw[2] ^= 1  # same size, one bit
    template.write_bytes(bytes(raw))
    with pytest.raises(ConvertError, match="that is damaged .*config.json: sha256 mismatch"):
        convert_checkpoint(src, out, progress=False)


@pytest.fixture
def small_tmpfs(tmpfs):
    return tmpfs("3m")


def test_refused_conversion_leaves_nothing_that_blocks_a_retry(checkpoint, small_tmpfs):
    src = checkpoint("qwen3_moe")
    out = small_tmpfs / "out"
    with pytest.raises(ConvertError, match="not enough free space"):  # 4.4 MB at 64 KiB
        convert_checkpoint(src, out, alignment=65536, progress=False)
    assert os.listdir(out) == []
    convert_checkpoint(src, out, alignment=4096, progress=False)  # 2.1 MB: fits
    assert (out / INDEX_FILE).exists()
    verify_layout(out)
