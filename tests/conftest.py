"""Shared fixtures: tiny mlx-community-format checkpoints and their converted layouts, cached per session."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family="qwen3_5_moe", **opts) -> Path``: a cached tiny checkpoint (see make_checkpoint)."""
    from flashmoe.fixtures import make_checkpoint

    cache: dict[str, object] = {}

    def make(family: str = "qwen3_5_moe", **opts):
        key = json.dumps([family, opts], sort_keys=True)
        if key not in cache:
            path = tmp_path_factory.mktemp("ckpt")
            cache[key] = make_checkpoint(path / family, family, **opts)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def layout(tmp_path_factory, checkpoint):
    """``layout(family="qwen3_5_moe", alignment=16384, **opts) -> (checkpoint, layout)``, cached."""
    from flashmoe.convert import convert_checkpoint

    cache: dict[str, object] = {}

    def make(family: str = "qwen3_5_moe", alignment: int = 16384, **opts):
        key = json.dumps([family, alignment, opts], sort_keys=True)
        if key not in cache:
            src = checkpoint(family, **opts)
            out = tmp_path_factory.mktemp("layout") / family
            convert_checkpoint(src, out, alignment=alignment, progress=False)
            cache[key] = (src, out)
        return cache[key]

    return make


# --- Hugging Face Hub emulator (tests/hub_emulator.py) ---

HUB_TOKEN = "hf_emulator_write_token"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A running local Hub; the real huggingface_hub client in this process and in subprocesses
    (``hub.env``) talks to it, with HF_HOME/HF_HUB_CACHE in tmp dirs, Xet off and a write token.

    Tree listings are paginated every 5 entries and LFS files above 300 kB use the multipart
    transfer, so that both client paths are exercised.
    """
    import sys
    from pathlib import Path

    from huggingface_hub import constants

    sys.path.insert(0, str(Path(__file__).parent))
    from hub_emulator import HubEmulator

    emulator = HubEmulator(
        tmp_path / "hub-server",
        tree_page_size=5,
        multipart_threshold=300_000,
        multipart_chunk=200_000,
    ).start()
    home = tmp_path / "hf-home"
    env = {
        "HF_ENDPOINT": emulator.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": HUB_TOKEN,
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    # huggingface_hub reads its environment at import time: patch the already-imported constants.
    patches = {
        "ENDPOINT": emulator.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": emulator.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
    }
    for k, v in patches.items():
        monkeypatch.setattr(constants, k, v, raising=False)
    emulator.env = {**os.environ, **env}
    emulator.env.pop("HF_HUB_OFFLINE", None)
    emulator.token = HUB_TOKEN
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size) -> Path``: a tmpfs of ``size`` (mount's spelling, e.g. "2m") under tmp_path,
    unmounted afterwards; the test is skipped where mounting is not allowed."""
    import subprocess

    mounts = []

    def mount(size: str):
        mnt = tmp_path / f"tmpfs-{len(mounts)}"
        mnt.mkdir()
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        mounts.append(mnt)
        return mnt

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
