"""``flashmoe-run ORG/NAME`` on a plain MLX checkpoint repo (no layout): plan, ask, convert, run.

The converter runs as a subprocess (``python -m flashmoe.convert.cli``): the runtime never imports
it. The layout goes into ``$HF_HOME/flashmoe/converted/ORG--NAME``; a rerun finds it there (or
resumes an interrupted conversion).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ..hubio import HubError, is_repo_id
from ..layouts import INDEX_FILE

CONVERTER = [sys.executable, "-m", "flashmoe.convert.cli"]


def is_plain_checkpoint_repo(model: str, revision: str | None) -> bool:
    """Whether ``model`` names a Hub repo without a flashmoe index but with safetensors weights.
    Offline, or when the Hub cannot tell, False: the layout path reports what is wrong."""
    if Path(model).expanduser().exists() or not is_repo_id(model):
        return False
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return False
    api = HfApi()
    try:
        if api.file_exists(model, INDEX_FILE, revision=revision):
            return False
        return api.file_exists(
            model, "model.safetensors.index.json", revision=revision
        ) or api.file_exists(model, "model.safetensors", revision=revision)
    except Exception:  # not found, no network...: the pull says so in one line
        return False


def converted_dir(repo_id: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "flashmoe" / "converted" / repo_id.replace("/", "--")


def convert_into_cache(
    repo_id: str, *, yes: bool, revision: str | None, err=sys.stderr, stdin=sys.stdin
) -> Path:
    """The layout of the checkpoint ``repo_id``, converted (after asking, unless ``yes``) into the
    cache on first use. HubError (one line) when refused or when the conversion fails."""
    out = converted_dir(repo_id)
    if (out / INDEX_FILE).is_file():
        return out
    rev = ["--revision", revision] if revision else []
    if not yes and not stdin.isatty():  # never convert hundreds of GB unasked
        raise HubError(
            f"{repo_id} is a plain MLX checkpoint, not a flashmoe layout: rerun with --yes to "
            f"convert it into {out} first (see `flashmoe-convert --plan {repo_id}`)"
        )
    print(f"{repo_id} is a plain MLX checkpoint, not a flashmoe layout; its plan:", file=err)
    err.flush()
    plan = subprocess.run(
        [*CONVERTER, "--plan", repo_id, *rev, "--quiet"], stdout=subprocess.PIPE, text=True
    )
    print(plan.stdout, end="", file=err)  # stdout is the generated text's
    if plan.returncode != 0:
        raise HubError(f"{repo_id}: cannot plan its conversion (see above)")
    if not yes:
        print(f"Convert it into {out} now? [y/N] ", end="", file=err, flush=True)
        if stdin.readline().strip().lower() not in ("y", "yes"):
            raise HubError(f"{repo_id}: not converted (answered no)")
    r = subprocess.run(
        [*CONVERTER, repo_id, "-o", str(out), *rev], stdout=subprocess.PIPE, text=True
    )
    print(r.stdout, end="", file=err)
    if r.returncode != 0:
        raise HubError(f"{repo_id}: conversion failed (rerun the same command to resume)")
    print(
        f"converted into {out}; publish it so the next user pulls the layout instead: "
        f"flashmoe-publish {out} ORG/NAME --base-model {repo_id}",
        file=err,
    )
    return out
