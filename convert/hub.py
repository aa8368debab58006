"""``flashmoe-publish LAYOUT ORG/NAME``: verify a layout and upload it to the Hugging Face Hub.

The layout is verified first (sizes and checksums), its model card (README.md) is refreshed for the
target repo, Hub limits are checked, then ``HfApi.create_repo(exist_ok=True)`` and
``HfApi.upload_folder``: the data files in one or more commits of bounded size, and the small files
with the index last, so that a repo never holds an index whose files are not all there. Every step
is resumable: re-running the same command skips what the Hub already has.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..cli import command
from ..fileio import atomic_write
from ..hubio import (
    HubError,
    check_repo_id,
    hub_error_message,
    progress_bars,
)
from ..layouts import CARD_FILE, INDEX_FILE, Index

PROG = "flashmoe-publish"
GB = 1000**3
FILE_RECOMMENDED = 200 * GB  # Hub: files under 200 GB recommended
FILE_LIMIT = 500 * GB  # Hub: hard limit per file
FOLDER_LIMIT = 10_000  # Hub: entries per folder
REPO_LIMIT = 100_000  # Hub: files per repo
COMMIT_BYTES = 100 * GB  # data bytes per commit (several commits for big layouts)
COMMIT_FILES = 200  # data files per commit


@dataclass
class UploadPlan:
    """What ``publish`` uploads: files (path, bytes) grouped into commits, in order."""

    repo_id: str
    revision: str
    private: bool
    commits: list[list[tuple[str, int]]]
    warnings: list[str] = field(default_factory=list)
    commit: str | None = None  # the last commit id, once uploaded

    @property
    def files(self) -> list[tuple[str, int]]:
        return [f for c in self.commits for f in c]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        from huggingface_hub import constants

        vis = "private" if self.private else "public"
        lines = [
            f"upload plan: {len(self.files)} files, {_human(self.total_bytes)} "
            f"({self.total_bytes:,} bytes) to {constants.ENDPOINT}/{self.repo_id} "
            f"(revision {self.revision}, {vis}), {len(self.commits)} commit(s)"
        ]
        for i, commit in enumerate(self.commits, 1):
            size = sum(s for _, s in commit)
            lines.append(f"  commit {i}/{len(self.commits)}: {len(commit)} files, {_human(size)}")
            lines += [f"    {s:>16,}  {name}" for name, s in commit]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def check_limits(files: list[tuple[str, int]]) -> list[str]:
    """Raise HubError for files the Hub refuses; return warnings for discouraged ones."""
    warnings = []
    folders: dict[str, int] = {}
    for name, size in files:
        if size >= FILE_LIMIT:
            raise HubError(
                f"{name}: {_human(size)} exceeds the Hub's {_human(FILE_LIMIT)} file limit"
            )
        if size >= FILE_RECOMMENDED:
            warnings.append(
                f"{name}: {_human(size)} is above the Hub's recommended 200 GB per file"
            )
        parent = os.path.dirname(name)
        folders[parent] = folders.get(parent, 0) + 1
    for folder, count in folders.items():
        if count >= FOLDER_LIMIT:
            raise HubError(
                f"{folder or '.'}: {count} files, the Hub allows fewer than {FOLDER_LIMIT} per folder"
            )
    if len(files) >= REPO_LIMIT:
        raise HubError(f"{len(files)} files, the Hub allows fewer than {REPO_LIMIT} per repo")
    return warnings


def plan_upload(
    root: Path, index: Index, repo_id: str, *, revision: str = "main", private: bool = False
) -> UploadPlan:
    """Group the layout's files into commits: data files (bounded), then small files + index."""
    data = [(e.file, e.size) for e in index.layers] + [(index.dense.name, index.dense.size)]
    small = [(f.name, f.size) for f in index.files]
    small += [
        (CARD_FILE, (root / CARD_FILE).stat().st_size),
        (INDEX_FILE, (root / INDEX_FILE).stat().st_size),
    ]
    commits: list[list[tuple[str, int]]] = []
    for name, size in data:
        last = commits[-1] if commits else None
        if (
            last is None
            or len(last) >= COMMIT_FILES
            or sum(s for _, s in last) + size > COMMIT_BYTES
        ):
            commits.append([])
        commits[-1].append((name, size))
    commits.append(small)
    plan = UploadPlan(repo_id, revision, private, commits)
    plan.warnings = check_limits(plan.files)
    return plan


def write_card(root: Path, index: Index, repo_id: str, base_model: str | None = None) -> Path:
    """Write (or refresh) README.md for ``repo_id``, keeping the license of the current card."""
    from .card import model_card

    path = root / CARD_FILE
    current = path.read_text(errors="replace") if path.is_file() else None
    text = model_card(index, source_readme=current, hub_repo=repo_id, base_model=base_model)
    atomic_write(path, text)
    return path


def _check_token(api, token: str | None) -> str:
    """The user name behind the token; HubError if there is none or it cannot write."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        info = api.whoami(token=token)
    except LocalTokenNotFoundError:
        raise HubError("no Hugging Face token: set HF_TOKEN or run `hf auth login`") from None
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise HubError(
                "the Hugging Face token is invalid or expired (HF_TOKEN or `hf auth login`)"
            ) from None
        raise HubError(hub_error_message(e)) from None
    except Exception as e:  # connection errors and the like
        raise HubError(hub_error_message(e)) from None
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError("the Hugging Face token is read-only: publishing needs a write token")
    return info.get("name", "?")


def publish(
    layout_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    progress: bool = True,
    base_model: str | None = None,
    out=sys.stdout,
) -> UploadPlan:
    """Verify the layout at ``layout_dir`` and upload it to the Hub model repo ``repo_id``.

    ``dry_run`` prints the plan and writes the card without any network access. ``base_model``:
    the Hub repo the checkpoint came from, for the card's ``base_model`` (a layout converted from a
    local copy records no origin). Returns the plan
    (with ``commit`` set after an upload). Raises HubError / LayoutError with a one-line message.
    """
    from ..verify import verify_layout

    check_repo_id(repo_id)
    if base_model is not None:
        try:
            check_repo_id(base_model)
        except HubError as e:
            raise HubError(f"--base-model: {e}") from None
    root = Path(layout_dir)
    api = None
    if not dry_run:  # a missing or read-only token fails before hashing hundreds of GB
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        _check_token(api, token)
    index = verify_layout(root, checksums=True, progress=progress)
    write_card(root, index, repo_id, base_model)
    plan = plan_upload(root, index, repo_id, revision=revision or "main", private=private)
    print(plan.describe(), file=out)
    if api is None:
        print(f"dry run: nothing uploaded; model card written to {root / CARD_FILE}", file=out)
        return plan

    message = commit_message or f"Upload flashmoe layout ({index.model_type})"
    try:
        with progress_bars(progress):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if plan.revision != "main":
                api.create_branch(repo_id, branch=plan.revision, exist_ok=True)
            for i, commit in enumerate(plan.commits, 1):
                part = (
                    f"{message} (part {i}/{len(plan.commits)})"
                    if len(plan.commits) > 1
                    else message
                )
                info = api.upload_folder(
                    repo_id=repo_id,
                    folder_path=root,
                    revision=plan.revision,
                    allow_patterns=[glob.escape(name) for name, _ in commit],
                    commit_message=part,
                )
                plan.commit = info.oid
    except HubError:
        raise
    except Exception as e:  # huggingface_hub and httpx raise many types: report one line
        raise HubError(
            hub_error_message(e, repo_id) + " (rerun the same command to resume)"
        ) from None
    print(f"published {repo_id} at {plan.revision} (commit {plan.commit})", file=out)
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Verify a flashmoe layout, write its model card and upload it to the Hugging "
        "Face Hub (resumable: rerun the same command after an interruption).",
    )
    p.add_argument("layout", metavar="LAYOUT", help="layout directory (flashmoe-convert output)")
    p.add_argument("repo_id", metavar="ORG/NAME", help="target Hub model repo (created if needed)")
    add_publish_options(p, with_repo=False)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the upload plan and write the model card, without network access",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def add_publish_options(p: argparse.ArgumentParser, *, with_repo: bool) -> None:
    """Options shared with ``flashmoe-convert --upload-repo``."""
    g = p.add_argument_group("Hugging Face Hub upload")
    if with_repo:
        g.add_argument(
            "--upload-repo",
            default=None,
            metavar="ORG/NAME",
            help="publish the layout to this repo",
        )
    g.add_argument("--private", action="store_true", help="create the repo private")
    g.add_argument(
        "--upload-revision" if with_repo else "--revision",
        dest="upload_revision",
        default=None,
        metavar="B",
        help="branch to upload to (created from main if missing)",
    )
    g.add_argument("--commit-message", default=None, metavar="M")
    g.add_argument(
        "--base-model",
        default=None,
        metavar="ORG/NAME",
        help="the Hub repo the checkpoint came from, for the model card (default: the origin "
        "the layout records, known only for a conversion from the Hub or its cache)",
    )


@command(PROG, resumable=True)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    publish(
        args.layout,
        args.repo_id,
        private=args.private,
        revision=args.upload_revision,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
        progress=not args.quiet,
        base_model=args.base_model,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
