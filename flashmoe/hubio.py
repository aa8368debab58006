"""Hugging Face Hub plumbing shared by the converter and the runtime: repo ids, one-line errors,
progress bars. Transfers and retries are huggingface_hub's own (``snapshot_download``,
``upload_folder``: resumable, with backoff)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from .cli import error_line
from .layouts import LayoutError

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class HubError(LayoutError):
    """A Hub operation that failed; the message is one line."""


def is_repo_id(s: object) -> bool:
    """Whether ``s`` is a Hub model repo id ``ORG/NAME``: ASCII letters, digits, '-', '_' and '.',
    each part starting with a letter or digit, and what ``huggingface_hub`` accepts (no '--' or
    '..', no trailing '-' or '.', no '.git' suffix)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(s, str) or _REPO_ID.fullmatch(s) is None:
        return False
    try:
        validate_repo_id(s)
    except HFValidationError:
        return False
    return True


def check_repo_id(s: str) -> str:
    """Return ``s`` if it is a repo id, else raise HubError explaining the expected form."""
    if not is_repo_id(s):
        raise HubError(
            f"invalid repo id {s!r}: expected ORG/NAME (letters, digits, '-', '_' and '.'; each "
            "part 1-96 characters, starting with a letter or digit and not ending in '-' or '.'; "
            "no '--', '..' or '.git' ending)"
        )
    return s


def hub_error_message(e: BaseException, repo_id: str | None = None) -> str:
    """A one-line description of an exception raised by ``huggingface_hub`` or its HTTP client."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id or "the Hub"
    if isinstance(e, LocalTokenNotFoundError):
        return "no Hugging Face token: set HF_TOKEN or run `hf auth login`"
    if isinstance(e, RevisionNotFoundError):
        return f"{where}: revision not found"
    if isinstance(e, GatedRepoError):
        return f"{where}: gated repository (accept its terms on the Hub and set HF_TOKEN)"
    if isinstance(e, RepositoryNotFoundError):
        return f"{where}: repository not found on {constants.ENDPOINT} (or private: set HF_TOKEN)"
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        server = (e.server_message or "").strip().splitlines()
        detail = server[0] if server else error_line(e)
        if status == 401:
            return f"{where}: the Hugging Face token was refused ({detail})"
        return f"{where}: HTTP {status}: {detail}" if status else f"{where}: {detail}"
    cause = e.__cause__ or e.__context__
    if isinstance(e, RuntimeError) and cause is not None:
        return f"{error_line(e)} ({hub_error_message(cause, repo_id)})"
    name = type(e).__name__
    if name in (
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "RemoteProtocolError",
        "ReadError",
    ):
        return f"{where}: connection to {constants.ENDPOINT} failed ({name}: {error_line(e)})"
    return error_line(e)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Silence huggingface_hub's progress bars for the duration, when not ``enabled``."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    was_disabled = are_progress_bars_disabled()
    if not enabled and not was_disabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            enable_progress_bars()
