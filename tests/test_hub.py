"""Publish and pull layouts through a local Hub emulator with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from flashmoe.convert import hub as publish_mod
from flashmoe.convert.hub import check_limits, publish
from flashmoe.layouts import INDEX_FILE, LayoutError, read_index, safe_relative_path
from flashmoe.runtime.hub import is_verified, pull

from flashmoe.hubio import HubError, is_repo_id

REPO = "flashmoe-test/tiny-moe"


def run(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(env or os.environ, PYTHONWARNINGS="ignore"),
        timeout=120,
    )


def one_line_error(r: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)  # as every flashmoe CLI
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def tiny_layout(layout, tmp_path) -> Path:
    """A private copy of the session's tiny layout (publish rewrites its README)."""
    _, src = layout("qwen3_5_moe")
    dst = tmp_path / "layout"
    shutil.copytree(src, dst)
    return dst


def published(hub, layout_dir: Path, repo: str = REPO, **kw) -> Path:
    publish(layout_dir, repo, progress=False, out=open(os.devnull, "w"), **kw)
    return layout_dir


# --------------------------------------------------------------------------- round trip


def test_publish_pull_run_gives_identical_tokens(hub, checkpoint, tmp_path):
    import mlx_lm
    from flashmoe.convert import convert_checkpoint
    from flashmoe.runtime import load
    from huggingface_hub import ModelCard

    # The source checkpoint lives on the Hub too, with an MIT card: the layout records it.
    src = checkpoint("qwen3_5_moe")
    hub.create_repo("Qwen/Tiny-MoE", "tester", False)
    for p in sorted(src.iterdir()):
        hub.put_file("Qwen/Tiny-MoE", p.name, p.read_bytes())
    src_commit = hub.put_file("Qwen/Tiny-MoE", "README.md", b"---\nlicense: mit\n---\n# tiny\n")
    local = tmp_path / "layout"
    convert_checkpoint("Qwen/Tiny-MoE", local, progress=False)

    plan = published(hub, local)
    assert plan.exists() and (local / "README.md").is_file()
    files = hub.file_paths(REPO)
    assert (
        INDEX_FILE in files and "README.md" in files and not any(f.endswith(".py") for f in files)
    )

    card = ModelCard((local / "README.md").read_text())
    data = card.data.to_dict()
    assert data["base_model"] == "Qwen/Tiny-MoE" and data["base_model_relation"] == "quantized"
    assert data["license"] == "mit" and data["pipeline_tag"] == "text-generation"
    assert {"mlx", "moe", "flashmoe", "qwen3_5_moe"} <= set(data["tags"])
    assert data["library_name"]
    assert f"flashmoe-run {REPO}" in card.text and "pip install flashmoe" in card.text
    assert src_commit in card.text and INDEX_FILE in card.text and "16,384" in card.text

    pulled = pull(REPO, progress=False)
    assert pulled != local and is_verified(pulled)
    for name in [INDEX_FILE, "model-dense.safetensors", "experts/layer-000.bin", "config.json"]:
        assert (pulled / name).read_bytes() == (local / name).read_bytes(), name
    assert not (pulled / ".gitattributes").exists()

    def greedy(path):
        model, tok = load(str(path))
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "Hello world"}], add_generation_prompt=True
        )
        return [r.token for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=12)]

    assert greedy(REPO) == greedy(local)


def test_cli_publish_then_pull(hub, tiny_layout, tmp_path):
    r = run("flashmoe.convert.hub", tiny_layout, REPO, "--commit-message", "first", env=hub.env)
    assert r.returncode == 0, r.stderr
    assert "published" in r.stdout
    out = tmp_path / "pulled"
    r = run("flashmoe.runtime.hub", REPO, "--local-dir", out, "--quiet", env=hub.env)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == out.resolve()
    assert read_index(out).num_experts == read_index(tiny_layout).num_experts
    assert is_verified(out)
    commit = hub.repos[REPO].branches["main"]
    assert hub.commits[commit].title.startswith("first")
    # flashmoe-run ORG/NAME pulls into the cache and generates what the local layout generates.
    gen = ("--prompt", "Hello", "--max-tokens", "6", "--temp", "0")
    remote = run("flashmoe.runtime.cli", REPO, *gen, env=hub.env)
    assert remote.returncode == 0 and remote.stdout.strip(), remote.stderr
    assert remote.stdout == run("flashmoe.runtime.cli", tiny_layout, *gen, env=hub.env).stdout


def test_dry_run_prints_plan_without_network(tiny_layout, tmp_path):
    (tiny_layout / "README.md").unlink()
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1")
    env.pop("HF_TOKEN", None)
    r = run("flashmoe.convert.hub", tiny_layout, REPO, "--dry-run", "--private", env=env)
    assert r.returncode == 0, r.stderr
    index = read_index(tiny_layout)
    for entry in index.layers:
        assert entry.file in r.stdout and f"{entry.size:,}" in r.stdout
    assert REPO in r.stdout and "private" in r.stdout and "revision main" in r.stdout
    assert INDEX_FILE in r.stdout and "dry run" in r.stdout
    assert f"flashmoe-run {REPO}" in (tiny_layout / "README.md").read_text()


def test_base_model_for_a_layout_of_a_local_copy(tiny_layout, capsys):
    from huggingface_hub import ModelCard

    def card():
        return ModelCard((tiny_layout / "README.md").read_text()).data

    devnull = open(os.devnull, "w")
    publish(tiny_layout, REPO, dry_run=True, progress=False, out=devnull)
    assert card().base_model is None  # converted from a local directory: no origin known
    publish(tiny_layout, REPO, dry_run=True, progress=False, out=devnull, base_model="org/base")
    assert card().base_model == "org/base" and card().base_model_relation == "quantized"
    assert "[org/base](https://huggingface.co/org/base)" in (tiny_layout / "README.md").read_text()
    assert publish_mod.main([str(tiny_layout), REPO, "--dry-run", "--base-model", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base-model: invalid repo id 'x'" in err[0], err


def test_upload_to_branch(hub, tiny_layout):
    """[R18]: a repo (branch) without the index is not a layout."""
    published(hub, tiny_layout, revision="v2")
    assert INDEX_FILE in hub.file_paths(REPO, "v2")
    assert INDEX_FILE not in hub.file_paths(REPO, "main")
    assert read_index(pull(REPO, revision="v2", progress=False)).layers
    with pytest.raises(HubError, match="not a flashmoe layout"):
        pull(REPO, progress=False)
    with pytest.raises(HubError, match="revision 'nope' not found"):
        pull(REPO, revision="nope", progress=False)


def test_private_repo_needs_token(hub, tiny_layout, monkeypatch):
    published(hub, tiny_layout, private=True)
    assert hub.repos[REPO].private
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="not found .*private: set HF_TOKEN"):
        pull(REPO, progress=False)


def test_convert_with_upload_repo(hub, checkpoint, tmp_path):
    out = tmp_path / "out"
    r = run(
        "flashmoe.convert.cli", checkpoint("qwen3_5_moe"), "-o", out, "--quiet",
        "--upload-repo", REPO, "--private", env=hub.env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert hub.repos[REPO].private and INDEX_FILE in hub.file_paths(REPO)
    r = run(
        "flashmoe.convert.cli", checkpoint("qwen3_5_moe"), "-o", tmp_path / "o2",
        "--upload-repo", "not a repo", env=hub.env,
    )  # fmt: skip
    one_line_error(r, "flashmoe-convert", "invalid repo id")
    assert not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------- interruptions


def test_interrupted_lfs_upload_resumes(hub, tiny_layout):
    hub.fail_lfs_upload_at = 4
    with pytest.raises(HubError, match="rerun the same command") as e:
        published(hub, tiny_layout)
    assert "\n" not in str(e.value)
    assert INDEX_FILE not in hub.file_paths(REPO)  # no index, no layout
    before = set(hub.uploaded_oids)
    assert before, "some objects were uploaded before the failure"
    hub.fail_lfs_upload_at = None
    published(hub, tiny_layout)
    assert len(hub.uploaded_oids) == len(set(hub.uploaded_oids)), "an object was uploaded twice"
    assert INDEX_FILE in hub.file_paths(REPO)
    assert is_verified(pull(REPO, progress=False))


def test_interrupted_commit_resumes(hub, tiny_layout, monkeypatch):
    monkeypatch.setattr(publish_mod, "COMMIT_FILES", 2)  # several commits for a tiny layout
    hub.abort_commit_at = 2
    with pytest.raises(HubError, match="connection .* failed.*rerun"):
        published(hub, tiny_layout)
    main = hub.repos[REPO].branches["main"]
    first = set(hub.commits[main].tree)
    assert "experts/layer-000.bin" in first and INDEX_FILE not in first
    hub.abort_commit_at = None
    published(hub, tiny_layout)
    titles = []
    c = hub.commits[hub.repos[REPO].branches["main"]]
    while c is not None:
        titles.append(c.title)
        c = hub.commits.get(c.parent) if c.parent else None
    assert sum("(part 1/" in t for t in titles) == 1, titles  # part 1 was not committed again
    assert is_verified(pull(REPO, progress=False))


# --------------------------------------------------------------------------- errors


def test_invalid_repo_id(hub, tiny_layout):
    assert not is_repo_id("-org/x") and not is_repo_id("org/" + "x" * 97)
    for bad in ["noslash", "a/b/c", "org/na--me", "org/x.git", "./local"]:
        assert not is_repo_id(bad)
    # the CLIs' one-line error (every entry point's refusal: test_one_repo_id_rule_everywhere)
    r = run("flashmoe.convert.hub", tiny_layout, "org/na--me", env=hub.env)
    one_line_error(r, "flashmoe-publish", "invalid repo id")
    r = run("flashmoe.runtime.hub", "a/b/c", env=hub.env)
    one_line_error(r, "flashmoe-pull", "invalid repo id")
    assert is_repo_id("mlx-community/Qwen3.5-397B-A17B-4bit")


@pytest.mark.parametrize("bad", ["org/a--b", "org/.hidden", "org/x.git", "org/x-", "org/_x"])
def test_one_repo_id_rule_everywhere(tiny_layout, tmp_path, monkeypatch, capsys, bad):
    """convert, publish, pull and load refuse the same ids, before touching the network."""
    from flashmoe.convert import ConvertError, convert_checkpoint
    from flashmoe.convert.cli import main as convert_main
    from flashmoe.runtime import load

    monkeypatch.chdir(tmp_path)  # no local directory of that name
    assert not is_repo_id(bad)
    with pytest.raises(ConvertError, match="not a Hugging Face repo id"):
        convert_checkpoint(bad, tmp_path / "out", progress=False)
    assert convert_main([str(tiny_layout), "-o", "out", "--upload-repo", bad, "--quiet"]) == 2
    assert "invalid repo id" in capsys.readouterr().err
    with pytest.raises(HubError, match="invalid repo id"):
        publish(tiny_layout, bad, dry_run=True, progress=False, out=open(os.devnull, "w"))
    with pytest.raises(HubError, match="invalid repo id"):
        pull(bad, progress=False)
    with pytest.raises(LayoutError, match="no such layout directory"):
        load(bad)
    assert not (tmp_path / "out").exists()


def test_missing_or_bad_token(hub, tiny_layout):
    env = {k: v for k, v in hub.env.items() if k != "HF_TOKEN"}
    r = run("flashmoe.convert.hub", tiny_layout, REPO, env=env)
    one_line_error(r, "flashmoe-publish", "no Hugging Face token", "HF_TOKEN")
    r = run("flashmoe.convert.hub", tiny_layout, REPO, env=dict(env, HF_TOKEN="hf_wrong"))
    one_line_error(r, "flashmoe-publish", "token")
    r = run(
        "flashmoe.convert.hub", tiny_layout, REPO, env=dict(env, HF_TOKEN="hf_emulator_read_token")
    )
    one_line_error(r, "flashmoe-publish", "read-only")
    assert REPO not in hub.repos


def test_missing_repo(hub):
    r = run("flashmoe.runtime.hub", "flashmoe-test/nothing-here", env=hub.env)
    one_line_error(r, "flashmoe-pull", "repository not found")


def test_tampered_file_on_hub_fails_naming_it(hub, tiny_layout):
    published(hub, tiny_layout)
    data = bytearray((tiny_layout / "experts/layer-002.bin").read_bytes())
    data[100] ^= 0xFF
    hub.tamper(REPO, "experts/layer-002.bin", bytes(data))
    r = run("flashmoe.runtime.hub", REPO, "--quiet", env=hub.env)
    one_line_error(r, "flashmoe-pull", "experts/layer-002.bin", "sha256 mismatch")
    r = run("flashmoe.runtime.cli", REPO, "--max-tokens", "2", env=hub.env)
    assert r.returncode == 2 and "experts/layer-002.bin" in r.stderr and "Traceback" not in r.stderr


def test_local_change_after_verification_is_caught(hub, tiny_layout, tmp_path):
    published(hub, tiny_layout)
    out = tmp_path / "d"
    root = pull(REPO, local_dir=out, progress=False)
    assert is_verified(root)
    target = root / "model-dense.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    assert not is_verified(root)
    # Offline, nothing is re-downloaded: the changed file fails verification, by name.
    from huggingface_hub import constants

    hub.stop()
    constants.HF_HUB_OFFLINE = True  # restored by the hub fixture's monkeypatch
    with pytest.raises(LayoutError, match="model-dense.safetensors: sha256 mismatch"):
        pull(REPO, local_dir=out, progress=False)


def test_offline_uses_verified_cache_without_rehash(hub, tiny_layout, monkeypatch):
    from huggingface_hub import constants

    published(hub, tiny_layout)
    root = pull(REPO, progress=False)
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_rehash(*a, **k):
        raise AssertionError("verified snapshot was hashed again")

    monkeypatch.setattr("flashmoe.verify.verify_layout", no_rehash)
    assert pull(REPO, progress=False) == root
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        pull("flashmoe-test/never-pulled", progress=False)


def _put_layout(hub, layout_dir: Path, repo: str, index: dict | None = None, extra=()) -> None:
    hub.create_repo(repo, "tester", False)
    for p in sorted(layout_dir.rglob("*")):
        if p.is_file():
            hub.put_file(repo, p.relative_to(layout_dir).as_posix(), p.read_bytes())
    if index is not None:
        hub.put_file(repo, INDEX_FILE, json.dumps(index).encode())
    for name, data in extra:
        hub.put_file(repo, name, data)


@pytest.mark.parametrize("bad", ["../../escape.bin", "/etc/hosts", "experts\\..\\..\\x.bin"])
def test_path_traversal_index_is_refused(hub, tiny_layout, bad):
    """[R16] through flashmoe-pull."""
    index = json.loads((tiny_layout / INDEX_FILE).read_text())
    index["layers"][0]["file"] = bad
    _put_layout(hub, tiny_layout, REPO, index)
    r = run("flashmoe.runtime.hub", REPO, "--quiet", env=hub.env)
    one_line_error(r, "flashmoe-pull", repr(bad), "not a plain relative path")


def test_symlink_out_of_layout_is_refused(tiny_layout, tmp_path):
    """[R17]"""
    outside = tmp_path / "outside.bin"
    shutil.copy(tiny_layout / "experts/layer-001.bin", outside)
    (tiny_layout / "experts/layer-001.bin").unlink()
    (tiny_layout / "experts/layer-001.bin").symlink_to(outside)
    with pytest.raises(LayoutError, match="resolves outside the layout"):
        read_index(tiny_layout)
    r = run("flashmoe.convert.hub", tiny_layout, REPO, "--dry-run")
    one_line_error(r, "flashmoe-publish", "layer-001.bin", "resolves outside the layout")


def test_cache_snapshot_symlinks_only_into_own_blobs(tmp_path):
    """[R17]: the Hugging Face cache exception."""
    snap = tmp_path / "models--a--b" / "snapshots" / ("0" * 40)
    blobs = tmp_path / "models--a--b" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "abc").write_bytes(b"x")
    (snap / "ok.bin").symlink_to("../../blobs/abc")
    assert safe_relative_path(snap, "ok.bin").read_bytes() == b"x"
    (tmp_path / "elsewhere").write_bytes(b"y")
    (snap / "bad.bin").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LayoutError, match="resolves outside"):
        safe_relative_path(snap, "bad.bin")


def test_cache_snapshot_parsing(tmp_path):
    """[R17]: which folders count as a Hugging Face cache snapshot (one parser for all users)."""
    from flashmoe.layouts import blob_sha256, cache_snapshot

    commit = "0123456789abcdef" * 2 + "01234567"
    snap = tmp_path / "models--org--name" / "snapshots" / commit
    snap.mkdir(parents=True)
    found = cache_snapshot(snap)
    assert (found.repo_id, found.commit) == ("org/name", commit)
    assert found.blobs == tmp_path.resolve() / "models--org--name" / "blobs"
    (tmp_path / "link").symlink_to(snap)  # resolved through symlinks
    assert cache_snapshot(tmp_path / "link") == found
    for other in [
        tmp_path / "models--org--name" / "snapshots" / "main",  # not a commit
        tmp_path / "datasets--org--name" / "snapshots" / commit,  # not a model repo
        tmp_path / "models--org--name" / "refs" / commit,
        tmp_path,
    ]:
        other.mkdir(parents=True, exist_ok=True)
        assert cache_snapshot(other) is None, other
    blob = "ab" * 32
    (snap / "w.safetensors").symlink_to(f"../../blobs/{blob}")
    (snap / "config.json").symlink_to("../../blobs/" + "c" * 40)  # a git (not LFS) blob
    assert blob_sha256(snap / "w.safetensors") == blob
    assert blob_sha256(snap / "config.json") is None


def test_pull_never_downloads_code(hub, tiny_layout):
    evil = b"raise SystemExit('remote code ran')\n"
    _put_layout(
        hub, tiny_layout, REPO, extra=[("modeling_evil.py", evil), ("experts/evil.py", evil)]
    )
    root = pull(REPO, progress=False)
    assert not list(root.rglob("*.py"))
    assert (root / "experts/layer-000.bin").is_file()


def test_hub_limits():
    gb = 1000**3
    assert check_limits([("experts/layer-000.bin", 7 * gb)]) == []
    warn = check_limits([("experts/layer-000.bin", 250 * gb)])
    assert len(warn) == 1 and "200 GB" in warn[0]
    with pytest.raises(HubError, match="layer-000.bin.*file limit"):
        check_limits([("experts/layer-000.bin", 600 * gb)])
    many = [(f"experts/layer-{i:05d}.bin", 1) for i in range(10_000)]
    with pytest.raises(HubError, match="experts: 10000 files"):
        check_limits(many)
