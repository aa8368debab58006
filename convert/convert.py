"""Repack an MLX MoE checkpoint into a flashmoe layout (see layouts/FORMAT.md)."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from flashmoe import __version__

from ..hubio import is_repo_id
from ..layouts import (
    CARD_FILE,
    DEFAULT_ALIGNMENT,
    DENSE_FILE,
    EXPERTS_DIR,
    FileEntry,
    Index,
    LayerFile,
    LayoutError,
    blob_sha256,
    layer_file,
    read_index,
)
from ..layouts.plan import all_split_plans, check_alignment
from ..verify import spot_check_layout
from .card import model_card
from .errors import ConvertError
from .fileio import finish, open_for_write, os_error, pwrite_full
from .geometry import ExpertPlan, check_family, plan_experts, unused_summary
from .lock import output_lock
from .model_check import check_mlx_lm_loads
from .safetensors_source import INDEX_JSON, Checkpoint, open_checkpoint
from .source import Source, aux_files, resolve_source
from .state import ConversionState, has_index, is_empty_output, write_index
from .writers import (
    Cancelled,
    compare_dense,
    compare_layer,
    copy_file,
    dense_size,
    write_dense,
    write_layer,
)


@dataclass
class Task:
    """One output file to write: ``run(progress, stop)`` returns the record to keep for it."""

    name: str  # relative to OUT, "/"-separated
    size: int  # final file size
    work: int  # bytes of progress it reports
    run: Callable


def _fingerprint(src: Source, ckpt: Checkpoint, aux: list[str], alignment: int) -> dict:
    files = [{"name": s.name, "size": s.size, "mtime_ns": s.mtime_ns} for s in ckpt.shards]
    for name in aux:
        st = os.stat(src.path / name)
        files.append({"name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {
        "created_by": f"flashmoe {__version__}",
        "source": str(src.path.resolve()),
        "files": files,
        "alignment": alignment,
    }


def _tasks(
    src_dir: Path, out: Path, plan: ExpertPlan, aux: list[str], alignment: int
) -> list[Task]:
    rec = plan.record_size(alignment)
    tasks = [
        Task(
            DENSE_FILE,
            dense_size(plan.dense),
            sum(t.nbytes for t in plan.dense),
            lambda progress, stop: {
                "sha256": write_dense(src_dir, plan.dense, out / DENSE_FILE, progress, stop)
            },
        )
    ]
    for entry in plan.layers:
        name = layer_file(entry.layer)
        tasks.append(
            Task(
                name,
                plan.num_experts * rec,
                plan.num_experts * plan.expert_bytes,
                lambda progress, stop, entry=entry, name=name: {
                    "checksums": write_layer(
                        src_dir,
                        entry.tensors,
                        plan.components,
                        plan.num_experts,
                        rec,
                        out / name,
                        progress,
                        stop,
                    )
                },
            )
        )
    for name in aux:
        size = os.path.getsize(src_dir / name)
        tasks.append(
            Task(
                name,
                size,
                size,
                lambda progress, stop, name=name: {
                    "sha256": copy_file(src_dir / name, out / name, progress)
                },
            )
        )
    return tasks


def _progress_bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
    )


def _run_parallel(jobs: list[Callable], workers: int, bar) -> list:
    """Run ``job(progress, stop)`` for every job on ``workers`` threads; first error stops the rest."""
    stop = threading.Event()
    lock = threading.Lock()

    def progress(n: int) -> None:
        if bar is not None:
            with lock:
                bar.update(n)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flashmoe-convert") as pool:
        futures = [pool.submit(job, progress, stop) for job in jobs]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # Ctrl-C: let running writers stop at their next batch
            stop.set()
            for f in futures:
                f.cancel()
            raise
        if any(f.exception() is not None for f in done if not f.cancelled()):
            stop.set()
            for f in futures:
                f.cancel()
            wait(futures)
            errors = [
                f.exception() for f in futures if not f.cancelled() and f.exception() is not None
            ]
            real = [e for e in errors if not isinstance(e, Cancelled)]
            raise (real or errors)[0]
        return [f.result() for f in futures]


def _check_space(out: Path, tasks: list[Task], pending: list[Task]) -> None:
    needed = sum(t.size for t in pending)
    st = os.statvfs(out)
    free = st.f_bavail * st.f_frsize
    for t in pending:  # leftovers of an interrupted run are replaced, so their space counts as free
        try:
            free += os.stat(out / (t.name + ".partial")).st_blocks * 512
        except OSError:
            pass
    if needed > free:
        total = sum(t.size for t in tasks)
        raise ConvertError(
            out,
            f"not enough free space: the layout needs {needed:,} more bytes ({total:,} in all), "
            f"{free:,} are free",
        )


def _same_source_file(recorded: dict, current: dict) -> bool:
    """Whether a ``source.files`` entry of a finished layout still describes ``current``."""
    if recorded.get("name") != current["name"] or recorded.get("size") != current["size"]:
        return False
    if recorded.get("sha256") and current["sha256"]:
        return recorded["sha256"] == current["sha256"]
    # No content hash on one side: the modification time stands in for it, as in a resume.
    return recorded.get("mtime_ns") == current["mtime_ns"]


def _source_mismatch(index: Index, source: dict, alignment: int) -> str | None:
    """Why the finished layout ``index`` is not this conversion, or None if it is."""
    if index.alignment != alignment:
        return f"alignment {index.alignment}, asked for {alignment}"
    recorded = index.source or {}
    for key in ("repo_id", "revision", "path"):
        if recorded.get(key) != source[key]:
            return f"source {key} {recorded.get(key)!r}, this source has {source[key]!r}"
    before = {f.get("name"): f for f in recorded.get("files", []) if isinstance(f, dict)}
    now = {f["name"]: f for f in source["files"]}
    if before.keys() != now.keys():
        changed = sorted(set(before) ^ set(now), key=str)
        return f"source files differ ({', '.join(map(str, changed))})"
    for name, current in now.items():
        if not _same_source_file(before[name], current):
            return f"source file {name} changed since"
    return None


def _prepare_output(out: Path, fingerprint: dict, source: dict, alignment: int):
    """``(state, None)`` to (re)start, or ``(None, (index, checked))`` if ``out`` already holds
    this layout (``checked`` says what was checked).

    A finished layout counts only if its index records this very source (same files, sizes and
    sha256, or modification times where no sha256 is known) and alignment, and it passes
    ``spot_check_layout``; otherwise it is left alone and the conversion refused.
    """
    if is_empty_output(out):
        return ConversionState.begin(out, fingerprint), None
    state = ConversionState.resume(out, fingerprint)
    if state is not None:
        return state, None
    if has_index(out):
        try:
            index = read_index(out)
        except LayoutError:
            index = None
        if index is not None:
            why = _source_mismatch(index, source, alignment)
            if why is not None:
                raise ConvertError(
                    out,
                    f"holds a finished layout of another source or with other options ({why}); "
                    "refusing to overwrite it: delete it or choose another output directory",
                )
            try:
                checked = spot_check_layout(out, index)
            except LayoutError as e:
                raise ConvertError(
                    out,
                    f"holds a finished layout of this source that is damaged ({e}); "
                    "delete it or choose another output directory",
                ) from None
            return None, (index, checked)
    raise ConvertError(
        out,
        "output directory is not empty and holds no conversion of this source with these options "
        "(refusing to overwrite; choose an empty or new directory)",
    )


def _source_files(src: Source, ckpt: Checkpoint, aux: list[str]) -> list[dict]:
    names = [s.name for s in ckpt.shards] + aux
    if (src.path / INDEX_JSON).is_file():
        names.append(INDEX_JSON)
    files = []
    for name in sorted(set(names)):
        p = src.path / name
        st = os.stat(p)
        sha = blob_sha256(p)
        files.append(
            {
                "name": name,
                "size": st.st_size,
                "sha256": sha,
                # a Hub file's content is its sha256; its mtime is only when it was fetched
                "mtime_ns": None if sha and src.from_hub else st.st_mtime_ns,
            }
        )
    return files


def _write_readme(out: Path, index: Index, src: Source) -> None:
    readme = src.path / CARD_FILE
    source_readme = readme.read_text(errors="replace") if readme.is_file() else None
    data = model_card(index, source_readme=source_readme).encode()
    partial = out / (CARD_FILE + ".partial")
    fd = open_for_write(partial, len(data))
    try:
        pwrite_full(fd, memoryview(data), 0)
    except BaseException:
        os.close(fd)
        raise
    finish(fd, partial, out / CARD_FILE)


def _verify_against_source(
    src_dir: Path, out: Path, plan: ExpertPlan, aux: list[str], alignment: int, workers, progress
):
    rec = plan.record_size(alignment)
    total = plan.num_experts * plan.expert_bytes * len(plan.layers) + sum(
        t.nbytes for t in plan.dense
    )
    bar = _progress_bar(progress, total, 0, "verify")
    jobs = [
        lambda p, stop, entry=entry: compare_layer(
            src_dir,
            entry.tensors,
            plan.components,
            plan.num_experts,
            rec,
            out / layer_file(entry.layer),
            entry.layer,
            p,
            stop,
        )
        for entry in plan.layers
    ]
    jobs.append(lambda p, stop: compare_dense(src_dir, plan.dense, out / DENSE_FILE, p))
    try:
        _run_parallel(jobs, workers, bar)
    finally:
        if bar is not None:
            bar.close()
    for name in aux:
        if (src_dir / name).read_bytes() != (out / name).read_bytes():
            raise ConvertError(out / name, "differs from the source")


def _hub_offline() -> bool:
    """Offline, a Hub repo converts from its cached snapshot (the whole checkpoint must be there)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    alignment: int = DEFAULT_ALIGNMENT,
    workers: int | None = None,
    verify: bool = False,
    progress: bool = True,
    revision: str | None = None,
    keep_source: bool = False,
    _check_free_space: bool = True,
) -> Index:
    """Convert the checkpoint ``src`` (directory or Hub repo id) into a layout at ``out``.

    Rerunning the same call after an interruption resumes it; the result is byte-identical to an
    uninterrupted run. Raises ConvertError (one line: file and problem) on bad input or I/O failure.
    A Hub repo id is converted shard by shard (``stream.py``); its shards leave the Hub cache as
    soon as they are converted, unless ``keep_source``.
    """
    try:
        check_alignment(alignment)
    except ValueError as e:
        raise ConvertError("--alignment", str(e)) from None
    out = Path(out)
    if not Path(src).exists() and is_repo_id(str(src)) and not _hub_offline():
        from .stream import convert_streaming

        return convert_streaming(
            str(src),
            out,
            alignment=alignment,
            workers=workers,
            verify=verify,
            progress=progress,
            revision=revision,
            keep_source=keep_source,
        )
    source = resolve_source(src, revision, progress)
    ckpt = open_checkpoint(source.path)
    check_family(ckpt)  # before the costlier mlx-lm load
    plan = plan_experts(ckpt, check_mlx_lm_loads(source.path, ckpt.config))
    if plan.unused and progress:
        print(
            f"flashmoe-convert: leaving out {len(plan.unused)} tensors that mlx-lm's "
            f"{plan.model_type} model does not load: {unused_summary(plan.unused)}",
            file=sys.stderr,
        )
    aux = aux_files(source.path)
    source_block = {
        "repo_id": source.repo_id,
        "revision": source.revision,
        "path": None if source.from_hub else str(source.path.resolve()),
        "files": _source_files(source, ckpt, aux),
    }
    fingerprint = _fingerprint(source, ckpt, aux, alignment)
    # benchmarks/convert_bench.py on 2 cores: 2 writers were as fast as or faster than 3 or 4.
    workers = workers or min(4, os.cpu_count() or 2)

    try:
        with output_lock(out):  # a second conversion into ``out`` fails here, at once
            state, existing = _prepare_output(out, fingerprint, source_block, alignment)
            if existing is not None:
                index, checked = existing
                if progress:
                    print(f"{out}: already converted ({checked})", file=sys.stderr)
                if verify:
                    _verify_against_source(
                        source.path, out, plan, aux, alignment, workers, progress
                    )
                return index
            try:
                return _write_layout(
                    state,
                    source,
                    ckpt,
                    plan,
                    aux,
                    source_block,
                    alignment,
                    workers,
                    verify,
                    progress,
                    _check_free_space,
                )
            except BaseException:
                if state.fresh and not state.any_finished():
                    state.discard()
                raise
    except OSError as e:
        raise os_error(e, out) from None


def build_index(
    config: dict,
    plan: ExpertPlan,
    records: dict,
    aux: list[str],
    source_block: dict,
    alignment: int,
) -> Index:
    """The index of a layout whose files are all written (``records``: name -> record)."""
    rec = plan.record_size(alignment)
    return Index(
        model_type=plan.model_type,
        config=config,
        num_experts=plan.num_experts,
        top_k=plan.top_k,
        alignment=alignment,
        expert_bytes=plan.expert_bytes,
        record_size=rec,
        components=plan.components,
        layers=[
            LayerFile(
                entry.layer,
                layer_file(entry.layer),
                plan.num_experts * rec,
                entry.prefix,
                records[layer_file(entry.layer)]["checksums"],
            )
            for entry in plan.layers
        ],
        dense=FileEntry(DENSE_FILE, records[DENSE_FILE]["size"], records[DENSE_FILE]["sha256"]),
        files=[FileEntry(name, records[name]["size"], records[name]["sha256"]) for name in aux],
        source=source_block,
        split_plans=all_split_plans(plan.expert_bytes, alignment),
        created_by=f"flashmoe {__version__}",
        version=plan.version,
    )


def _write_layout(
    state: ConversionState,
    source: Source,
    ckpt: Checkpoint,
    plan: ExpertPlan,
    aux: list[str],
    source_block: dict,
    alignment: int,
    workers: int,
    verify: bool,
    progress: bool,
    check_free_space: bool,
) -> Index:
    """Write (or finish) the layout in ``state.out``; the caller holds the output lock."""
    out = state.out
    tasks = _tasks(source.path, out, plan, aux, alignment)
    records = {t.name: state.finished(t.name) for t in tasks}
    pending = [t for t in tasks if records[t.name] is None]
    # Biggest first: the dense file is one sequential stream and should not be left for last.
    pending.sort(key=lambda t: -t.size)
    needed = sum(t.size for t in tasks)
    try:
        (out / EXPERTS_DIR).mkdir(exist_ok=True)
        if check_free_space:
            _check_space(out, tasks, pending)
        bar = _progress_bar(
            progress,
            sum(t.work for t in tasks),
            sum(t.work for t in tasks if records[t.name]),
            "convert",
        )

        def job(task: Task) -> Callable:
            def run(progress_cb, stop):
                try:
                    record = dict(task.run(progress_cb, stop), size=task.size)
                except OSError as e:
                    raise os_error(e, out / task.name, needed) from None
                state.mark_finished(task.name, record)
                return record

            return run

        try:
            for task, record in zip(
                pending, _run_parallel([job(t) for t in pending], workers, bar), strict=True
            ):
                records[task.name] = record
        finally:
            if bar is not None:
                bar.close()
        if verify:
            _verify_against_source(source.path, out, plan, aux, alignment, workers, progress)

        index = build_index(ckpt.config, plan, records, aux, source_block, alignment)
        _write_readme(out, index, source)
        write_index(out, index)
    except OSError as e:
        raise os_error(e, out, needed) from None
    state.remove()
    return index
