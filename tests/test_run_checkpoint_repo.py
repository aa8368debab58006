"""``flashmoe-run ORG/NAME`` on a Hub repo holding a plain MLX checkpoint: refused without --yes
when not interactive; with --yes planned, converted into the cache, run (Hub emulator)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_convert_plan import upload_checkpoint
from test_convert_stream import layout_files

REPO = "flashmoe-test/tiny-moe-checkpoint"
GEN = ("--prompt", "Hello", "--max-tokens", "6", "--temp", "0")


def run(*args, env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.cli", *map(str, args)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env=dict(env, PYTHONWARNINGS="ignore"),
        timeout=300,
    )


def test_run_plain_checkpoint_repo(hub, layout):
    src, local_layout = layout("qwen3_5_moe")
    upload_checkpoint(hub, src)
    r = run(REPO, *GEN, env=hub.env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--yes" in lines[0], r.stderr
    assert not [p for m, p in hub.requests if m == "GET" and p.endswith(".safetensors")]

    r = run(REPO, *GEN, "--yes", env=hub.env)
    assert r.returncode == 0, r.stderr
    assert "disk needed" in r.stderr and f"--base-model {REPO}" in r.stderr
    assert r.stdout.strip()
    converted = Path(os.environ["HF_HOME"]) / "flashmoe" / "converted" / REPO.replace("/", "--")
    assert layout_files(converted) == layout_files(local_layout)  # so the same tokens


def test_interactive_run_asks_before_converting(hub, checkpoint):
    import io

    import pytest
    from flashmoe.runtime.from_checkpoint import convert_into_cache, converted_dir

    from flashmoe.hubio import HubError

    upload_checkpoint(hub, checkpoint("qwen3_5_moe"))
    master, slave = os.openpty()  # a real terminal on stdin
    os.write(master, b"n\n")
    err = io.StringIO()
    with open(slave) as tty, pytest.raises(HubError, match="answered no"):
        convert_into_cache(REPO, yes=False, revision=None, err=err, stdin=tty)
    os.close(master)
    assert "[y/N]" in err.getvalue() and not converted_dir(REPO).exists()
