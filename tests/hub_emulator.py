"""A local Hugging Face Hub for tests: the HTTP endpoints the real ``huggingface_hub`` client calls.

Covers repo creation, whoami, branches, preupload, the LFS batch API (basic and multipart transfers,
verify), NDJSON commits, model info, paginated tree listings and file resolve (HEAD/GET with Range).
Objects live on local disk under ``root``; repos, branches and commits are kept in memory with
40-hex commit ids. Use with ``HF_HUB_DISABLE_XET=1`` (the Xet protocol is not emulated).

Fault injection for resume tests: ``fail_lfs_upload_at = N`` answers the N-th LFS PUT with 403 (like
an expired presigned URL; the client does not retry it), ``abort_commit_at = N`` drops the
connection of the N-th commit request without applying it; ``cut_downloads`` drops a download
mid-body, ``pause_download`` holds one mid-body until the test releases it (to kill the client
there), ``missing_files`` answers 404. ``bytes_served`` counts the bytes downloaded per path.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_TOKENS = {
    "hf_emulator_write_token": {"name": "tester", "role": "write"},
    "hf_emulator_read_token": {"name": "reader", "role": "read"},
}
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"
    b"*.npz filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.zst filter=lfs diff=lfs merge=lfs -text\n"
)
REGULAR_MAX = 10 * 1024 * 1024  # larger files must go through LFS
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Entry:
    """One file of a commit's tree."""

    size: int
    sha256: str  # content address in the object store
    lfs: bool
    blob_id: str = ""  # git blob id (of the LFS pointer for LFS files)


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    tree: dict[str, Entry]


@dataclass
class Pause:
    """A download held after ``at`` bytes: ``reached`` is set there; once ``release`` is set
    the body goes on, or the connection drops if ``drop`` (after the test killed the client)."""

    at: int
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    drop: bool = False


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, commit: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class HubEmulator:
    """The Hub's state plus a threaded HTTP server on 127.0.0.1; ``start()`` / ``stop()``."""

    def __init__(
        self,
        root: str | Path,
        *,
        tokens: dict[str, dict] | None = None,
        tree_page_size: int = 1000,
        multipart_threshold: int | None = None,
        multipart_chunk: int = 1 << 20,
    ):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "incoming").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.tree_page_size = tree_page_size
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk = multipart_chunk
        self.repos: dict[str, Repo] = {}
        self.commits: dict[str, Commit] = {}
        self.lock = threading.RLock()
        # fault injection and counters
        self.fail_lfs_upload_at: int | None = None
        self.abort_commit_at: int | None = None
        self.lfs_put_count = 0
        self.commit_request_count = 0
        self.uploaded_oids: list[str] = []  # sha256 of every LFS object stored, in order
        self.requests: list[tuple[str, str]] = []  # (method, path) log
        # called as on_request(method, path, headers) before a request is served (tests measure)
        self.on_request = None
        # seconds each request waits before it is served, outside the lock (a remote Hub's
        # round trip, for benchmarks: requests in parallel overlap it)
        self.latency = 0.0
        # file path -> drop the next whole-file GET after N bytes (a dropped connection)
        self.cut_downloads: dict[str, int] = {}
        self.missing_files: set[str] = set()  # 404 but to range requests (a failed download)
        self.pauses: dict[str, Pause] = {}
        # file path -> body bytes sent by downloads (GETs to the end of the file, resumptions
        # included; not the range requests that read a header)
        self.bytes_served: dict[str, int] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ server
    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubEmulator:
        hub = self

        class Handler(_Handler):
            emulator = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="hub-emulator", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> HubEmulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ objects
    def _object_path(self, sha: str) -> Path:
        return self.root / "objects" / sha

    def _store(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._object_path(sha)
        if not path.exists():
            tmp = self.root / "incoming" / secrets.token_hex(8)
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha

    def _entry(self, data_sha: str, size: int, lfs: bool) -> Entry:
        if lfs:
            blob_id = git_blob_sha1(lfs_pointer(data_sha, size))
        else:
            blob_id = git_blob_sha1(self._object_path(data_sha).read_bytes())
        return Entry(size=size, sha256=data_sha, lfs=lfs, blob_id=blob_id)

    def has_object(self, sha: str, size: int | None = None) -> bool:
        p = self._object_path(sha)
        return p.is_file() and (size is None or p.stat().st_size == size)

    # ------------------------------------------------------------------ test helpers
    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Replace the bytes served for ``path`` without touching its metadata (a corrupt mirror)."""
        with self.lock:
            entry = self.resolve(repo_id, revision)[1].tree[path]
            self._object_path(entry.sha256).write_bytes(data)

    def put_file(
        self,
        repo_id: str,
        path: str,
        data: bytes,
        *,
        lfs: bool | None = None,
        revision: str = "main",
        message: str = "test upload",
    ) -> str:
        """Commit one file directly (bypassing HTTP); return the commit id."""
        with self.lock:
            repo, head = self.resolve(repo_id, revision)
            tree = dict(head.tree)
            use_lfs = self._is_lfs(head, path, len(data), data[:512]) if lfs is None else lfs
            tree[path] = self._entry(self._store(data), len(data), use_lfs)
            return self._new_commit(repo, revision, head.oid, message, "", tree).oid

    def put_local_file(self, repo_id: str, path: str, local: Path, revision: str = "main") -> str:
        """Commit the large file ``local`` as an LFS file, hashed and copied in 1 MiB pieces (a
        benchmark's gigabytes never sit in memory); return the commit id."""
        digest = hashlib.sha256()
        tmp = self.root / "incoming" / secrets.token_hex(8)
        with open(local, "rb") as f, open(tmp, "wb") as dst:
            while buf := f.read(1 << 20):
                digest.update(buf)
                dst.write(buf)
        sha = digest.hexdigest()
        if self.has_object(sha):
            tmp.unlink()
        else:
            tmp.replace(self._object_path(sha))
        with self.lock:
            repo, head = self.resolve(repo_id, revision)
            tree = dict(head.tree)
            tree[path] = self._entry(sha, local.stat().st_size, True)
            return self._new_commit(repo, revision, head.oid, f"add {path}", "", tree).oid

    def put_sparse_file(
        self, repo_id: str, path: str, head: bytes, size: int, revision: str = "main"
    ) -> str:
        """Commit an LFS file of ``size`` bytes: ``head``, then zeros stored as a hole (a shard
        of gigabytes costs no disk and no write); return the commit id. Its content address is
        the sha256 of ``head`` and ``size``, not of the bytes (hashing gigabytes of zeros would
        cost what a benchmark measures): for clients that read ranges (safetensors headers),
        a full download would fail a sha256 check."""
        assert len(head) <= size, (path, len(head), size)
        sha = hashlib.sha256(head + b"\0sparse %d" % size).hexdigest()
        obj = self._object_path(sha)
        if not obj.exists():
            tmp = self.root / "incoming" / secrets.token_hex(8)
            with open(tmp, "wb") as f:
                f.write(head)
                f.truncate(size)
            tmp.replace(obj)
        with self.lock:
            repo, head_commit = self.resolve(repo_id, revision)
            tree = dict(head_commit.tree)
            tree[path] = self._entry(sha, size, True)
            return self._new_commit(repo, revision, head_commit.oid, f"add {path}", "", tree).oid

    def pause_download(self, path: str, at: int) -> Pause:
        """Hold the next GET of ``path`` that passes byte ``at`` there (see ``Pause``)."""
        self.pauses[path] = Pause(at)
        return self.pauses[path]

    def file_paths(self, repo_id: str, revision: str = "main") -> list[str]:
        with self.lock:
            return sorted(self.resolve(repo_id, revision)[1].tree)

    # ------------------------------------------------------------------ model
    def user_for(self, auth: str | None) -> dict | None:
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "basic":
            try:
                token = base64.b64decode(token).decode().partition(":")[2]
            except ValueError:
                return None
        elif scheme.lower() != "bearer":
            return None
        return self.tokens.get(token.strip())

    def _new_commit(
        self,
        repo: Repo,
        branch: str,
        parent: str | None,
        title: str,
        description: str,
        tree: dict[str, Entry],
    ) -> Commit:
        seed = json.dumps([repo.repo_id, parent, title, sorted(tree), time.time_ns()]).encode()
        oid = hashlib.sha1(seed + secrets.token_bytes(8)).hexdigest()
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        commit = Commit(oid, parent, title, description, date, tree)
        self.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def create_repo(self, repo_id: str, owner: str, private: bool) -> Repo:
        with self.lock:
            if repo_id in self.repos:
                raise HubError(409, "You already created this model repo")
            repo = Repo(repo_id, owner, private)
            self.repos[repo_id] = repo
            tree = {
                ".gitattributes": self._entry(self._store(GITATTRIBUTES), len(GITATTRIBUTES), False)
            }
            self._new_commit(repo, "main", None, "initial commit", "", tree)
            return repo

    def get_repo(self, repo_id: str, user: dict | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or user["name"] != repo.owner)):
            if user is None:
                raise HubError(401, "Invalid username or password.", "RepoNotFound")
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def resolve(
        self, repo_id: str, revision: str, user: dict | None = None, *, check: bool = False
    ) -> tuple[Repo, Commit]:
        repo = self.get_repo(repo_id, user) if check else self.repos[repo_id]
        if revision in repo.branches:
            return repo, self.commits[repo.branches[revision]]
        if re.fullmatch(r"[0-9a-f]{40}", revision) and revision in self.commits:
            return repo, self.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _is_lfs(self, head: Commit, path: str, size: int, sample: bytes) -> bool:
        if size > REGULAR_MAX or b"\0" in sample:
            return True
        attrs = head.tree.get(".gitattributes")
        if attrs is None:
            return False
        for line in self._object_path(attrs.sha256).read_text().splitlines():
            parts = line.split()
            if len(parts) > 1 and "filter=lfs" in parts[1:]:
                pat = parts[0]
                name = path if "/" in pat else PurePosixPath(path).name
                if fnmatch.fnmatchcase(name, pat):
                    return True
        return False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    emulator: HubEmulator

    def log_message(self, format, *args) -> None:  # noqa: A002 - quiet
        pass

    # ------------------------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": e.message}
        if e.code:
            headers["X-Error-Code"] = e.code
        if e.commit:
            headers["X-Repo-Commit"] = e.commit
        self._json(e.status, {"error": e.message}, headers)

    def _user(self, *, required: bool = False, write: bool = False) -> dict | None:
        auth = self.headers.get("Authorization")
        user = self.emulator.user_for(auth)
        if auth and user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        if user is None and (required or write):
            raise HubError(401, "Invalid credentials in Authorization header")
        if write and user.get("role") != "write":
            raise HubError(403, "You don't have the rights to write to this repo (read-only token)")
        return user

    def _dispatch(self) -> None:
        hub = self.emulator
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        raw = split.path
        hub.requests.append((self.command, raw))
        if hub.on_request is not None:
            hub.on_request(self.command, unquote(raw), self.headers)
        segs = [unquote(s) for s in raw.strip("/").split("/")]
        if hub.latency:
            time.sleep(hub.latency)
        try:
            with hub.lock:
                self._route(segs, raw)
        except HubError as e:
            self._error(e)
        except (KeyError, ValueError, TypeError) as e:
            self._error(HubError(400, f"bad request: {e!r}"))
        except (BrokenPipeError, ConnectionResetError):  # the client went away (or was killed)
            self.close_connection = True
        except _Abort:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _route(self, s: list[str], raw: str) -> None:
        m = self.command
        if s[:2] == ["api", "whoami-v2"] and m == "GET":
            return self.whoami()
        if s[:3] == ["api", "repos", "create"] and m == "POST":
            return self.create_repo()
        if s[:2] == ["api", "validate-yaml"] and m == "POST":
            return self.validate_yaml()
        if len(s) >= 4 and s[:2] == ["api", "models"]:
            repo_id, rest = f"{s[2]}/{s[3]}", s[4:]
            if not rest and m == "GET":
                return self.model_info(repo_id, "main")
            if rest[:1] == ["revision"] and len(rest) == 2 and m == "GET":
                return self.model_info(repo_id, rest[1])
            if rest[:1] == ["tree"] and len(rest) >= 2 and m == "GET":
                return self.tree(repo_id, rest[1], "/".join(rest[2:]), raw)
            if rest[:1] == ["preupload"] and len(rest) == 2 and m == "POST":
                return self.preupload(repo_id, rest[1])
            if rest[:1] == ["commit"] and len(rest) == 2 and m == "POST":
                return self.commit(repo_id, rest[1])
            if rest[:1] == ["branch"] and len(rest) >= 2 and m == "POST":
                return self.create_branch(repo_id, "/".join(rest[1:]))
        if s[:2] == ["_emulator", "lfs"] and m == "PUT":
            return self.lfs_put(s[2])
        if s[:2] == ["_emulator", "part"] and m == "PUT":
            return self.lfs_part(s[2], int(s[3]))
        if s[:2] == ["_emulator", "complete"] and m == "POST":
            return self.lfs_complete(s[2])
        if len(s) >= 5 and s[1].endswith(".git") and s[2:4] == ["info", "lfs"]:
            repo_id = f"{s[0]}/{s[1][:-4]}"
            if s[4:] == ["objects", "batch"] and m == "POST":
                return self.lfs_batch(repo_id)
            if s[4:] == ["objects", "verify"] and m == "POST":
                return self.lfs_verify(repo_id)
        if len(s) >= 5 and s[2] == "resolve" and m in ("GET", "HEAD"):
            return self.resolve_file(f"{s[0]}/{s[1]}", s[3], "/".join(s[4:]))
        raise HubError(404, f"no route for {m} {raw}")

    # ------------------------------------------------------------------ endpoints
    def whoami(self) -> None:
        user = self._user(required=True)
        self._json(
            200,
            {
                "type": "user",
                "id": hashlib.md5(user["name"].encode()).hexdigest()[:24],
                "name": user["name"],
                "fullname": user["name"],
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "emulator", "role": user["role"]},
                },
            },
        )

    def create_repo(self) -> None:
        user = self._user(write=True)
        body = json.loads(self._body() or b"{}")
        if body.get("type", "model") != "model":
            raise HubError(400, "the emulator only hosts model repos")
        name, org = body.get("name", ""), body.get("organization") or user["name"]
        if not NAME_RE.match(name) or not NAME_RE.match(org) or ".." in name or "--" in name:
            raise HubError(400, f"Invalid repo name {org}/{name}")
        repo_id = f"{org}/{name}"
        private = body.get("visibility") == "private" or bool(body.get("private"))
        try:
            self.emulator.create_repo(repo_id, user["name"], private)
        except HubError as e:
            self._json(
                409,
                {"error": e.message, "url": f"{self.emulator.url}/{repo_id}"},
                {"X-Error-Message": e.message},
            )
            return
        self._json(200, {"url": f"{self.emulator.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def validate_yaml(self) -> None:
        body = json.loads(self._body() or b"{}")
        content = body.get("content", "")
        errors = []
        if content.startswith("---"):
            parts = content.split("\n---", 1)
            try:
                meta = yaml.safe_load(parts[0][3:]) if len(parts) == 2 else None
                if len(parts) != 2:
                    errors.append({"message": "unterminated YAML front matter"})
                elif meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "YAML front matter must be a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def model_info(self, repo_id: str, revision: str) -> None:
        user = self._user()
        repo, commit = self.emulator.resolve(repo_id, revision, user, check=True)
        siblings = []
        for p, e in sorted(commit.tree.items()):
            sib = {"rfilename": p, "size": e.size, "blobId": e.blob_id}
            if e.lfs:
                sib["lfs"] = {
                    "size": e.size,
                    "sha256": e.sha256,
                    "pointerSize": len(lfs_pointer(e.sha256, e.size)),
                }
            siblings.append(sib)
        card = {}
        if "README.md" in commit.tree:
            text = self.emulator._object_path(commit.tree["README.md"].sha256).read_text(
                errors="replace"
            )
            if text.startswith("---") and "\n---" in text:
                try:
                    card = yaml.safe_load(text[3:].split("\n---", 1)[0]) or {}
                except yaml.YAMLError:
                    card = {}
        self._json(
            200,
            {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "createdAt": commit.date,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": list(card.get("tags") or []) if isinstance(card, dict) else [],
                "library_name": card.get("library_name") if isinstance(card, dict) else None,
                "cardData": card if isinstance(card, dict) else {},
                "siblings": siblings,
            },
        )

    def tree(self, repo_id: str, revision: str, path: str, raw: str) -> None:
        user = self._user()
        _, commit = self.emulator.resolve(repo_id, revision, user, check=True)
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        expand = self.query.get("expand", "false").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        files = {p: e for p, e in commit.tree.items() if p.startswith(prefix)}
        if prefix and not files:
            raise HubError(404, f"{path} does not exist", "EntryNotFound", commit.oid)
        dirs: set[str] = set()
        entries: list[tuple[str, Entry | None]] = []
        for p, e in files.items():
            rel = p[len(prefix) :].split("/")
            for i in range(1, len(rel)):
                d = prefix + "/".join(rel[:i])
                if recursive or i == 1:
                    dirs.add(d)
            if recursive or len(rel) == 1:
                entries.append((p, e))
        entries += [(d, None) for d in dirs]
        entries.sort(key=lambda t: t[0])
        out = []
        for p, e in entries:
            if e is None:
                oid = hashlib.sha1(p.encode()).hexdigest()
                item = {"type": "directory", "oid": oid, "size": 0, "path": p}
            else:
                item = {"type": "file", "oid": e.blob_id, "size": e.size, "path": p}
                if e.lfs:
                    item["lfs"] = {
                        "oid": e.sha256,
                        "size": e.size,
                        "pointerSize": len(lfs_pointer(e.sha256, e.size)),
                    }
            if expand:
                item["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
            out.append(item)
        size = self.emulator.tree_page_size
        page = size if not expand else min(size, 50)
        start = int(self.query.get("cursor", "0"))
        chunk = out[start : start + page]
        headers = {}
        if start + page < len(out):
            q = f"recursive={str(recursive).lower()}&expand={str(expand).lower()}&cursor={start + page}"
            headers["Link"] = f'<{self.emulator.url}{raw}?{q}>; rel="next"'
        self._json(200, chunk, headers)

    def preupload(self, repo_id: str, revision: str) -> None:
        user = self._user(write=True)
        _, head = self.emulator.resolve(repo_id, revision, user, check=True)
        body = json.loads(self._body())
        if self.query.get("create_pr"):
            raise HubError(400, "the emulator does not support pull requests")
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self.emulator._is_lfs(head, f["path"], int(f["size"]), sample)
            item = {
                "path": f["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            existing = head.tree.get(f["path"])
            if existing is not None:
                item["oid"] = existing.sha256 if existing.lfs else existing.blob_id
            files.append(item)
        self._json(200, {"files": files, "commitOid": head.oid})

    def lfs_batch(self, repo_id: str) -> None:
        hub = self.emulator
        user = self._user(write=True)
        hub.get_repo(repo_id, user)
        body = json.loads(self._body())
        if body.get("operation") != "upload":
            raise HubError(400, "the emulator only supports LFS uploads through the batch API")
        objects = []
        for o in body.get("objects", []):
            oid, size = o["oid"], int(o["size"])
            item = {"oid": oid, "size": size, "authenticated": True}
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                item["error"] = {"code": 422, "message": "invalid oid"}
            elif not hub.has_object(oid, size):
                verify = {"href": f"{hub.url}/{repo_id}.git/info/lfs/objects/verify", "header": {}}
                if hub.multipart_threshold is not None and size > hub.multipart_threshold:
                    upload_id = f"{oid}.{secrets.token_hex(4)}.{size}"
                    header = {"chunk_size": str(hub.multipart_chunk)}
                    nparts = -(-size // hub.multipart_chunk)
                    for i in range(1, nparts + 1):
                        header[f"{i:05d}"] = f"{hub.url}/_emulator/part/{upload_id}/{i}"
                    upload = {"href": f"{hub.url}/_emulator/complete/{upload_id}", "header": header}
                else:
                    upload = {"href": f"{hub.url}/_emulator/lfs/{oid}.{size}", "header": {}}
                item["actions"] = {"upload": upload, "verify": verify}
            objects.append(item)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _count_put(self) -> None:
        hub = self.emulator
        hub.lfs_put_count += 1
        if hub.fail_lfs_upload_at is not None and hub.lfs_put_count == hub.fail_lfs_upload_at:
            raise HubError(403, "Request has expired (emulated upload failure)")

    def lfs_put(self, target: str) -> None:
        oid, _, size = target.partition(".")
        data = self._body()
        self._count_put()
        if len(data) != int(size) or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its oid/size")
        self.emulator._store(data)
        self.emulator.uploaded_oids.append(oid)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def lfs_part(self, upload_id: str, part: int) -> None:
        data = self._body()
        self._count_put()
        d = self.emulator.root / "incoming" / upload_id
        d.mkdir(exist_ok=True)
        (d / f"{part:05d}").write_bytes(data)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def lfs_complete(self, upload_id: str) -> None:
        body = json.loads(self._body())
        oid, size = upload_id.split(".")[0], int(upload_id.split(".")[2])
        d = self.emulator.root / "incoming" / upload_id
        parts = sorted(p["partNumber"] for p in body.get("parts", []))
        try:
            data = b"".join((d / f"{n:05d}").read_bytes() for n in parts)
        except FileNotFoundError:
            raise HubError(400, "missing part in multipart completion") from None
        if body.get("oid") != oid or len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "multipart upload does not match its oid/size")
        self.emulator._store(data)
        self.emulator.uploaded_oids.append(oid)
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
        self._json(200, {"success": True})

    def lfs_verify(self, repo_id: str) -> None:
        self._user(write=True)
        body = json.loads(self._body())
        if not self.emulator.has_object(body.get("oid", ""), body.get("size")):
            raise HubError(404, f"LFS object {body.get('oid')} not found")
        self._json(200, {"success": True})

    def commit(self, repo_id: str, revision: str) -> None:
        hub = self.emulator
        user = self._user(write=True)
        data = self._body()
        hub.commit_request_count += 1
        if hub.abort_commit_at is not None and hub.commit_request_count == hub.abort_commit_at:
            raise _Abort()
        repo = hub.get_repo(repo_id, user)
        if self.query.get("create_pr"):
            raise HubError(400, "the emulator does not support pull requests")
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = hub.commits[repo.branches[revision]]
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and not head.oid.startswith(parent):
            raise HubError(
                412, f"A commit has happened since. Please refresh and try again. ({parent})"
            )
        tree = dict(head.tree)
        for item in lines[1:]:
            key, v = item.get("key"), item.get("value", {})
            path = v.get("path", "")
            if not path or path.startswith("/") or ".." in PurePosixPath(path).parts:
                raise HubError(400, f"invalid path {path!r}")
            if key == "file":
                content = (
                    base64.b64decode(v["content"])
                    if v.get("encoding") == "base64"
                    else v["content"].encode()
                )
                tree[path] = hub._entry(hub._store(content), len(content), False)
            elif key == "lfsFile":
                oid = v["oid"]
                size = v.get("size")
                if not hub.has_object(oid, size):
                    raise HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that "
                        f"does not exist. For instance: {path}",
                    )
                tree[path] = hub._entry(oid, hub._object_path(oid).stat().st_size, True)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}")
            elif key == "deletedFolder":
                pre = path.rstrip("/") + "/"
                for p in [p for p in tree if p.startswith(pre)]:
                    del tree[p]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        c = hub._new_commit(
            repo, revision, head.oid, header.get("summary", ""), header.get("description", ""), tree
        )
        self._json(
            200,
            {
                "success": True,
                "commitOid": c.oid,
                "commitUrl": f"{hub.url}/{repo_id}/commit/{c.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def create_branch(self, repo_id: str, branch: str) -> None:
        hub = self.emulator
        user = self._user(write=True)
        repo = hub.get_repo(repo_id, user)
        body = json.loads(self._body() or b"{}")
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = body.get("startingPoint") or "main"
        _, base = hub.resolve(repo_id, start)
        repo.branches[branch] = base.oid
        self._json(200, {"success": True})

    def resolve_file(self, repo_id: str, revision: str, path: str) -> None:
        hub = self.emulator
        user = self._user()
        _, commit = hub.resolve(repo_id, revision, user, check=True)
        entry = commit.tree.get(path)
        if entry is None or (path in hub.missing_files and "Range" not in self.headers):
            raise HubError(404, "Entry not found", "EntryNotFound", commit.oid)
        obj = hub._object_path(entry.sha256)
        size = entry.size
        headers = {
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.blob_id}"',
            "Content-Disposition": f'inline; filename="{PurePosixPath(path).name}"',
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(size)
        start, end, status = 0, size, 200
        download = True  # to the end of the file (not a bounded range: a header read)
        rng = self.headers.get("Range")
        if rng:
            mm = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not mm or (mm.group(1) == "" and mm.group(2) == ""):
                raise HubError(416, "invalid range")
            download = mm.group(1) != "" and mm.group(2) == ""
            if mm.group(1) == "":
                start, end = max(size - int(mm.group(2)), 0), size
            else:
                start = int(mm.group(1))
                end = min(int(mm.group(2)) + 1, size) if mm.group(2) else size
            if start >= size and size > 0:
                self._send(416, b"", {**headers, "Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = hub.cut_downloads.pop(path, None) if not rng else None
        pause = hub.pauses.get(path)
        if pause is not None and start < pause.at < end:
            del hub.pauses[path]
        else:
            pause = None
        with open(obj, "rb") as f:
            f.seek(start)
            pos = start
            stop = cut if cut is not None else pause.at if pause is not None else end
            while pos < end:
                buf = f.read(min(end - pos, stop - pos, 1 << 20)) if stop > pos else b""
                if buf:
                    self.wfile.write(buf)
                    if download:
                        hub.bytes_served[path] = hub.bytes_served.get(path, 0) + len(buf)
                    pos += len(buf)
                    continue
                if cut is not None or pos < stop:  # cut here, or the file ended early
                    raise _Abort
                self.wfile.flush()
                pause.reached.set()
                if not pause.release.wait(60) or pause.drop:
                    raise _Abort
                stop = end


class _Abort(Exception):
    """Drop the connection without answering."""
