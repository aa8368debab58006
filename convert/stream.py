"""``flashmoe-convert ORG/NAME -o OUT``: convert a Hub checkpoint shard by shard, with bounded disk.

The small files (config, tokenizer, weight index) are downloaded first and the experts planned from
the header replica (``remote.py``). Then the shards are fetched in layer order through
``hf_hub_download`` (the Hub cache, its auth and its transfers), the next one downloading while
the current one is repacked: its dense tensors go to their place in the dense file, its layers'
experts to their layer files (a layer spanning shards a shard at a time: ``stream_parts.py``).
Then nothing needs it any more and it leaves the cache (unless ``keep_source``, or the shard was in
the cache before: then it is the user's), so two shards at most are on disk at a time.

Interrupted, a rerun resumes from the layout's state: finished layer files, the parts of layers
written into their partial files and the dense tensors of finished shards are kept, and only the
shards still needed are fetched. huggingface_hub 2.x does not resume a download across processes:
the shard that was downloading is fetched again, and the leftover of the killed download is
deleted. The layout is byte-identical to converting a full download.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import tempfile
import threading
from pathlib import Path

from flashmoe import __version__

from ..hubio import progress_bars
from ..layouts import DENSE_FILE, EXPERTS_DIR, Index, blob_sha256, cache_snapshot, layer_file
from .convert import (
    _prepare_output,
    _progress_bar,
    _run_parallel,
    _write_readme,
    build_index,
)
from .errors import ConvertError
from .fileio import finish, open_for_write, os_error, preadv_full, pwrite_full
from .geometry import ExpertPlan, MoeLayer, check_family, plan_experts, unused_summary
from .lock import output_lock
from .model_check import check_mlx_lm_loads
from .remote import RemoteFile, list_files, write_replica
from .safetensors_source import INDEX_JSON, Checkpoint, TensorInfo, open_checkpoint, parse_shard
from .source import ALLOW_PATTERNS, Source, aux_files
from .state import ConversionState, write_index
from .stream_parts import Slice, compare_part, finish_part, shard_slices, write_part
from .writers import CHUNK, _check, compare_layer, copy_file, dense_header, write_layer

SMALL_PATTERNS = [p for p in ALLOW_PATTERNS if not p.endswith(".safetensors")]


def _small_files(repo_id: str, revision: str | None, progress: bool) -> Path:
    """Download everything but the shards; the snapshot directory in the Hub cache."""
    from huggingface_hub import snapshot_download

    from .remote import _fail

    try:
        with progress_bars(progress):
            return Path(
                snapshot_download(repo_id, revision=revision, allow_patterns=SMALL_PATTERNS)
            )
    except Exception as e:  # huggingface_hub raises many types; all mean "could not get it"
        raise _fail(repo_id, e) from None


def _plan(repo_id: str, commit: str, snap: Path, files: dict[str, RemoteFile], progress: bool):
    """``(checkpoint, plan)`` from the header replica (tensor offsets are the real ones)."""
    with tempfile.TemporaryDirectory(prefix="flashmoe-headers-") as tmp:
        inexact = write_replica(repo_id, commit, files, Path(tmp), progress, small_files=snap)
        if inexact:
            raise ConvertError(
                f"{repo_id}/{inexact[0]}",
                "its header cannot be rebuilt from the Hub's metadata; download the checkpoint "
                "and convert the directory",
            )
        try:
            ckpt = open_checkpoint(tmp)
            check_family(ckpt)
            plan = plan_experts(ckpt, check_mlx_lm_loads(Path(tmp), ckpt.config))
        except ConvertError as e:  # name the repo, not the temporary directory
            raise ConvertError(e.file.replace(tmp, repo_id), e.problem) from None
    ckpt.path = snap
    return ckpt, plan


def _forwarding_tqdm(bar):
    """A tqdm class for ``hf_hub_download`` that prints nothing and counts into ``bar``."""
    from tqdm import tqdm

    class Forward(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.update(kwargs.get("initial") or 0)

        def update(self, n=1):
            if bar is not None and n:
                bar.update(n)

    return Forward


class DenseWriter:
    """The dense file, filled shard by shard at the tensors' final offsets, hashed once the last
    shard's tensors are in (by the job that wrote them, beside that shard's layer jobs)."""

    def __init__(self, out: Path, tensors: list[TensorInfo], state: ConversionState) -> None:
        self.tensors = sorted(tensors, key=lambda t: t.name)
        self.head = dense_header(self.tensors)
        self.offsets, pos = {}, len(self.head)
        for t in self.tensors:
            self.offsets[t.name] = pos
            pos += t.nbytes
        self.size = pos
        self.final = out / DENSE_FILE
        self.partial = out / (DENSE_FILE + ".partial")
        self.state = state
        shards = {t.file for t in self.tensors}
        resumable = self.partial.is_file() and self.partial.stat().st_size == self.size
        self.done = {s for s in shards if resumable and state.has_part(f"dense/{s}")}
        if self.done:
            self.fd = os.open(self.partial, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        else:
            self.fd = open_for_write(self.partial, self.size)
            pwrite_full(self.fd, memoryview(self.head), 0)
        self.pending = shards - self.done
        self.buf = memoryview(bytearray(CHUNK))
        self.sha256: str | None = None

    def job(self, src_dir: Path, shard: str):
        """``write_shard`` as a ``_run_parallel`` job; the one that writes the last pending shard
        also hashes the file, so the hash runs beside the last shard's layer jobs, not after."""

        def run(progress, stop) -> None:
            self.write_shard(src_dir, shard, progress, stop)
            if not self.pending:
                self.sha256 = self._hash(stop)

        return run

    def write_shard(self, src_dir: Path, shard: str, progress, stop=None) -> None:
        buf = self.buf
        fd = os.open(src_dir / shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for t in (t for t in self.tensors if t.file == shard):
                _check(stop)
                pos = self.offsets[t.name]
                for start in range(t.start, t.end, CHUNK):
                    n = min(CHUNK, t.end - start)
                    preadv_full(fd, [buf[:n]], start, src_dir / shard)
                    pwrite_full(self.fd, buf[:n], pos)
                    pos += n
                    progress(n)
        finally:
            os.close(fd)
        os.fsync(self.fd)  # before the part is recorded as done
        self.state.mark_part(f"dense/{shard}")
        self.pending.discard(shard)

    def _hash(self, stop=None) -> str:
        digest = hashlib.sha256()
        fd = os.open(self.partial, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            for pos in range(0, self.size, CHUNK):
                _check(stop)
                n = min(CHUNK, self.size - pos)
                preadv_full(fd, [self.buf[:n]], pos, self.partial)
                digest.update(self.buf[:n])
        finally:
            os.close(fd)
        return digest.hexdigest()

    def finish(self) -> dict:
        """Commit the file (every shard written); its record."""
        sha = self.sha256 or self._hash()  # not hashed yet if an earlier run wrote every shard
        fd, self.fd = self.fd, -1
        finish(fd, self.partial, self.final)  # closes fd
        return {"sha256": sha, "size": self.size}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Prefetch:
    """``fetch(shard, bar)`` on a daemon thread (Ctrl-C does not wait for a download)."""

    def __init__(self, fetch, shard: str, bar) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                fetch(shard, bar)
            except BaseException as e:  # re-raised in the converting thread by wait()
                self.error = e

        self.thread = threading.Thread(target=run, name="flashmoe-fetch", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _shard_order(layers: list[MoeLayer], dense_shards: set[str]) -> list[str]:
    """Shards in the order the layers need them, then those only the dense file needs."""
    order: dict[str, None] = {}
    for entry in layers:
        for t in entry.tensors:
            order.setdefault(t.file)
    for s in sorted(dense_shards):
        order.setdefault(s)
    return list(order)


def _source_block(
    repo_id: str, commit: str, snap: Path, ckpt: Checkpoint, files: dict, aux: list[str]
) -> dict:
    """What a conversion of the full download records (``convert._source_files``)."""
    shards = {s.name for s in ckpt.shards}
    names = set(shards) | set(aux) | ({INDEX_JSON} if (snap / INDEX_JSON).is_file() else set())
    entries = []
    for name in sorted(names):
        if name in shards:
            f = files[name]
            entries.append({"name": name, "size": f.size, "sha256": f.sha256, "mtime_ns": None})
        else:
            st, sha = os.stat(snap / name), blob_sha256(snap / name)
            mtime = None if sha else st.st_mtime_ns  # as convert._source_files for a Hub source
            entries.append({"name": name, "size": st.st_size, "sha256": sha, "mtime_ns": mtime})
    return {"repo_id": repo_id, "revision": commit, "path": None, "files": entries}


def convert_streaming(
    repo_id: str,
    out: str | os.PathLike,
    *,
    alignment: int,
    workers: int | None,
    verify: bool,
    progress: bool,
    revision: str | None,
    keep_source: bool = False,
) -> Index:
    """Convert the Hub checkpoint ``repo_id`` into ``out``, fetching shards as the layers need
    them (see the module docstring). Raises ConvertError with one line."""
    out = Path(out)
    snap = _small_files(repo_id, revision, False)  # one bar, the conversion's (below)
    snapshot = cache_snapshot(snap)
    commit = snapshot.commit if snapshot else revision
    files = list_files(repo_id, commit)
    ckpt, plan = _plan(repo_id, commit, snap, files, False)
    if plan.unused and progress:
        print(
            f"flashmoe-convert: leaving out {len(plan.unused)} tensors that mlx-lm's "
            f"{plan.model_type} model does not load: {unused_summary(plan.unused)}",
            file=sys.stderr,
        )
    aux = aux_files(snap)
    source_block = _source_block(repo_id, commit, snap, ckpt, files, aux)
    fingerprint = {
        "created_by": f"flashmoe {__version__}",
        "source": f"hub:{repo_id}@{commit}",
        "files": [{k: f[k] for k in ("name", "size", "sha256")} for f in source_block["files"]],
        "alignment": alignment,
    }
    workers = workers or min(4, os.cpu_count() or 2)
    try:
        with output_lock(out):
            state, existing = _prepare_output(out, fingerprint, source_block, alignment)
            if existing is not None:
                index, checked = existing
                if progress:
                    print(f"{out}: already converted ({checked})", file=sys.stderr)
                return index
            try:
                job = _Job(repo_id, commit, snap, files, ckpt, plan, aux, state, alignment)
                records = job.run(workers, verify, progress, keep_source)
                index = build_index(ckpt.config, plan, records, aux, source_block, alignment)
                _write_readme(out, index, Source(snap, repo_id, commit, True))
                write_index(out, index)
            except BaseException:
                if state.fresh and not state.any_finished():
                    state.discard()
                raise
            state.remove()
            return index
    except OSError as e:
        raise os_error(e, out) from None


class _Job:
    """One streamed conversion: which shards to fetch, when to write and when to release."""

    def __init__(self, repo_id, commit, snap, files, ckpt, plan: ExpertPlan, aux, state, alignment):
        self.repo_id, self.commit, self.snap, self.files = repo_id, commit, snap, files
        self.ckpt, self.plan, self.aux, self.state = ckpt, plan, aux, state
        self.out: Path = state.out
        self.rec = plan.record_size(alignment)

    def _fetch(self, shard: str, bar) -> None:
        from huggingface_hub import hf_hub_download

        from .remote import _fail

        path = self.snap / shard
        if path.exists():  # already in the cache: the user's, or fetched by an earlier run
            if bar is not None:
                bar.update(self.files[shard].size)
        else:
            self.state.mark_part(f"fetched/{shard}")  # ours to release
            self._drop_stale_download(shard)
            try:
                hf_hub_download(
                    self.repo_id, shard, revision=self.commit, tqdm_class=_forwarding_tqdm(bar)
                )
            except Exception as e:  # huggingface_hub raises many types; all mean "not fetched"
                err = _fail(self.repo_id, e)
                raise ConvertError(f"{self.repo_id}/{shard}", err.problem) from None
        _, infos = parse_shard(self.snap, shard)
        planned = {t.name: t for t in self.ckpt.tensors.values() if t.file == shard}
        if {t.name: t for t in infos} != planned:
            raise ConvertError(
                f"{self.repo_id}/{shard}", "header differs from the planned one (repo changed?)"
            )

    def _drop_stale_download(self, shard: str) -> None:
        """Delete what a killed download of ``shard`` left in the Hub cache.

        huggingface_hub 2.x downloads into a process-unique ``blobs/<sha256>.<id>.incomplete``
        and deletes it when a download fails, but not when its process is killed; it never
        resumes one (the rerun fetches the shard again). Such a file is stale once nobody holds
        the blob's lock (``.locks/<repo>/<sha256>.lock``, held by huggingface_hub while it
        downloads); left there it would hold up to a shard of disk for ever.
        """
        sha, repo_dir = self.files[shard].sha256, self.snap.parent.parent
        stale = list((repo_dir / "blobs").glob(f"{sha}.*.incomplete")) if sha else []
        if not stale:
            return
        try:
            fd = os.open(repo_dir.parent / ".locks" / repo_dir.name / f"{sha}.lock", os.O_RDWR)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a download holds it
            for p in stale:
                p.unlink(missing_ok=True)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _release(self, shard: str, keep_source: bool) -> None:
        if keep_source or not self.state.has_part(f"fetched/{shard}"):
            return
        link = self.snap / shard
        blob = link.resolve()
        link.unlink(missing_ok=True)
        if blob != link and blob.parent.name == "blobs":
            blob.unlink(missing_ok=True)

    def run(self, workers: int, verify: bool, progress: bool, keep_source: bool) -> dict:
        plan, state, out, snap = self.plan, self.state, self.out, self.snap
        (out / EXPERTS_DIR).mkdir(exist_ok=True)
        records = {}
        for name in self.aux:  # small, and already here
            records[name] = state.finished(name)
            if records[name] is None:
                sha = copy_file(snap / name, out / name, lambda n: None)
                records[name] = {"sha256": sha, "size": os.path.getsize(out / name)}
                state.mark_finished(name, records[name])
        records[DENSE_FILE] = state.finished(DENSE_FILE)
        dense = None if records[DENSE_FILE] else DenseWriter(out, plan.dense, state)
        try:
            pending = []
            for entry in plan.layers:
                records[layer_file(entry.layer)] = state.finished(layer_file(entry.layer))
                if records[layer_file(entry.layer)] is None:
                    pending.append(entry)
            dense_shards = dense.pending if dense else set()
            order, work = self._work(pending, _shard_order(pending, dense_shards), dense_shards)
            self._check_space(pending, dense, order)
            total = sum(self.files[s].size for s in order)
            total += sum(n for items in work.values() for _, _, n in items)
            if dense:
                total += sum(t.nbytes for t in plan.dense if t.file in dense.pending)
            bar = _progress_bar(progress, total, 0, "convert")
            try:
                prefetch: _Prefetch | None = None
                for i, shard in enumerate(order):
                    if prefetch is not None:
                        prefetch.wait()
                    else:
                        self._fetch(shard, bar)
                    # the next shard downloads while this one is repacked: two shards at most
                    # on disk, since everything that needs this one is done before it leaves
                    more = i + 1 < len(order)
                    prefetch = _Prefetch(self._fetch, order[i + 1], bar) if more else None
                    jobs = [self._layer_job(e, shard, kind, verify) for e, kind, _ in work[shard]]
                    # the dense job first: the last one hashes the file, the longest single job
                    first = [dense.job(snap, shard)] if dense and shard in dense.pending else []
                    results = _run_parallel(first + jobs, workers, bar)[len(first) :]
                    for (entry, kind, _), record in zip(work[shard], results, strict=True):
                        if kind != "part":
                            records[layer_file(entry.layer)] = record
                    self._release(shard, keep_source)
            finally:
                if bar is not None:
                    bar.close()
            if dense:
                records[DENSE_FILE] = dense.finish()
                state.mark_finished(DENSE_FILE, records[DENSE_FILE])
        finally:
            if dense:
                dense.close()
        return records

    def _work(self, pending: list[MoeLayer], order: list[str], dense_shards: set[str]):
        """``(shards to fetch in order, {shard: [(layer, kind, bytes)]})``: kind "whole" (the
        layer lies in this shard), "part" (this shard's components of a layer that spans
        shards) or "last" (its last shard's: finishes the layer file). Parts an earlier run
        wrote into a layer's partial file are not redone."""
        work: dict[str, list] = {s: [] for s in order}
        size = self.plan.num_experts * self.rec
        for entry in pending:
            files = [s for s in order if any(t.file == s for t in entry.tensors)]
            slices = {s: self._slices(entry, s) for s in files}
            nbytes = {s: sum(x.nbytes for x in slices[s]) for s in files}
            if len(files) == 1:
                work[files[0]].append((entry, "whole", nbytes[files[0]]))
                continue
            partial = self.out / (layer_file(entry.layer) + ".partial")
            if not (partial.is_file() and partial.stat().st_size == size):
                partial.unlink(missing_ok=True)  # parts recorded for it are void
                resumable = False
            else:
                resumable = True
            for s in files[:-1]:
                if not (resumable and self.state.has_part(f"{layer_file(entry.layer)}/{s}")):
                    work[s].append((entry, "part", nbytes[s]))
            work[files[-1]].append((entry, "last", nbytes[files[-1]]))
        order = [s for s in order if work[s] or s in dense_shards]
        return order, work

    def _check_space(self, pending: list[MoeLayer], dense, order: list[str]) -> None:
        """Room for the rest of the layout and, where the Hub cache is, two shards at a time
        (a layer spanning more, per-expert tensors, is written a shard at a time too)."""
        layout = len(pending) * self.plan.num_experts * self.rec + (dense.size if dense else 0)
        fetch = sorted(self.files[s].size for s in order if not (self.snap / s).exists())
        held = sum(fetch[-2:])
        st_out, st_cache = os.statvfs(self.out), os.statvfs(self.snap)
        free_out = st_out.f_bavail * st_out.f_frsize
        free_cache = st_cache.f_bavail * st_cache.f_frsize
        same = os.stat(self.out).st_dev == os.stat(self.snap).st_dev
        if (layout + held if same else layout) > free_out:
            need = f"{layout:,} bytes for the layout" + (f" + {held:,} for shards" if same else "")
            raise ConvertError(self.out, f"not enough free space: {need}, {free_out:,} are free")
        if not same and held > free_cache:
            raise ConvertError(
                self.snap, f"not enough free space for shards: {held:,} bytes, {free_cache:,} free"
            )

    def _slices(self, entry: MoeLayer, shard: str) -> list[Slice]:
        return shard_slices(entry.tensors, self.plan.components, self.plan.num_experts, shard)

    def _layer_job(self, entry: MoeLayer, shard: str, kind: str, verify: bool):
        """Write what ``shard`` holds of ``entry``'s layer file (``_work`` says what)."""
        plan, name = self.plan, layer_file(entry.layer)
        size, n, rec = plan.num_experts * self.rec, plan.num_experts, self.rec
        src, final, partial = self.snap / shard, self.out / name, self.out / (name + ".partial")

        def run(progress_cb, stop):
            if kind == "whole":
                args = (self.snap, entry.tensors, plan.components, n, rec)
                checksums = write_layer(*args, final, progress_cb, stop)
                if verify:  # now, while its shards are here
                    compare_layer(*args, final, entry.layer, lambda n: None, stop)
            elif kind == "part":
                slices = self._slices(entry, shard)
                write_part(src, slices, n, rec, partial, progress_cb, stop)
                if verify:
                    compare_part(src, slices, rec, partial, entry.layer, stop)
                self.state.mark_part(f"{name}/{shard}")
                return None
            else:
                slices = self._slices(entry, shard)
                checksums = finish_part(
                    src, slices, plan.expert_bytes, n, rec, final, progress_cb, stop
                )
                if verify:
                    compare_part(src, slices, rec, final, entry.layer, stop)
            record = {"checksums": checksums, "size": size}
            self.state.mark_finished(name, record)
            return record

        return run
