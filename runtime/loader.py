"""``load()``: build mlx-lm's own model from a layout, with every SwitchGLU streamed from disk."""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP
from mlx_lm.utils import _get_classes, load_model, load_tokenizer

from ..cli import error_line
from ..hubio import is_repo_id
from ..layouts import (
    DENSE_FILE,
    INDEX_FILE,
    MAX_SPLIT,
    TOKENIZER_FILES,
    Index,
    LayoutError,
    lists_tokenizer,
    read_index,
    text_config,
)
from ..layouts.families import layer_of_module_path
from ..metal.memory import GiB, physical_memory, set_limits
from .group import RankError, agree, world
from .pipeline import Plan, plan_stages, split_model
from .reader import make_reader
from .sizing import default_budget, kv_cache_bytes, slots_for_budget
from .store import ExpertStore, default_io_threads
from .streaming import StreamingSwitchGLU, Timed, Timing, commit_early, link_next_layers


@dataclass
class Runtime:
    """What ``load`` attaches to the model as ``model.flashmoe``."""

    root: Path
    index: Index
    store: ExpertStore
    slots: int
    top_k: int
    timing: Timing | None
    budget_note: str
    group: object = None  # the mx.distributed group of a pipelined model, else None
    plan: Plan | None = None  # its stages (which layers each rank runs)

    @property
    def rank(self) -> int:
        return 0 if self.group is None else self.group.rank()

    def close(self, *, gather: bool = True) -> None:
        """Close the layer files, the routing trace and the reader; no streaming afterwards
        (a second call does nothing).

        On a pipelined model, first wait for this rank's work in flight (mlx-lm's last step
        runs asynchronously: a rank that exits before its transfers ran leaves the others
        waiting); call it on every rank before exiting. With a routing trace, rank 0 then
        gathers every rank's layers into its file (a collective: pass ``gather=False`` on
        every rank after another rank failed; the file then holds rank 0's layers only)."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            if self.group is not None:
                from .group import finish

                finish(self.group)
            trace = getattr(self.store, "trace", None)
            if trace is not None:
                trace.close()
                if self.group is not None:
                    _gather_trace(self.group, trace.path, gather)
        finally:
            self.store.close()


def resolve_model_path(path_or_repo: str, **pull_options) -> Path:
    """A local layout directory, or a Hub repo id pulled (and verified) into the local cache."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    if is_repo_id(path_or_repo):
        from .hub import pull

        return pull(path_or_repo, **pull_options)
    raise LayoutError(f"{path_or_repo}: no such layout directory")


def _hub_repo(path_or_repo: str) -> str | None:
    """``path_or_repo`` when ``resolve_model_path`` would pull it from the Hub, else None."""
    if Path(path_or_repo).expanduser().exists() or not is_repo_id(path_or_repo):
        return None
    return path_or_repo


def _pull_stage(repo: str, root: Path, revision: str | None, stage, progress: bool) -> None:
    """Pull (and verify) the layer files of this rank's MoE layers into the snapshot ``root``
    (which holds the rest of the layout already), pinned to its commit."""
    from ..layouts import cache_snapshot
    from .hub import pull

    snapshot = cache_snapshot(root)
    commit = snapshot.commit if snapshot else revision
    pulled = pull(repo, revision=commit, layers=stage.moe_layers, progress=progress)
    if os.path.realpath(pulled) != os.path.realpath(root):  # the index moved meanwhile
        raise LayoutError(f"{repo}: changed on the Hub while loading ({root} -> {pulled})")


def _reserve_std_fds() -> None:
    """Open /dev/null on closed stdin/stdout/stderr: a file opened later must not get fd 0 (MLX's
    safetensors loader takes fd 0 for a failed open)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            new = os.open(os.devnull, os.O_RDWR)
            if new != fd:
                os.dup2(new, fd)
                os.close(new)


def _check_arguments(bank_experts, memory_budget_gb, cache_io_split, io_threads, k) -> None:
    """Refuse mistyped ``load`` arguments with one line (not ``std::bad_cast`` later)."""
    for name, value in (("bank_experts", bank_experts), ("k", k)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    for name, value in (("cache_io_split", cache_io_split), ("io_threads", io_threads)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if io_threads < 1:
        raise ValueError(f"io_threads must be at least 1, got {io_threads}")
    if memory_budget_gb is not None:
        ok = isinstance(memory_budget_gb, (int, float)) and not isinstance(memory_budget_gb, bool)
        if not ok or not math.isfinite(memory_budget_gb) or memory_budget_gb < 0:
            raise ValueError(
                f"memory budget must be a finite number of GB >= 0, got {memory_budget_gb!r}"
            )


def _check_config_file(root: Path, index: Index) -> None:
    """``config.json`` (what mlx-lm builds the model from) must be the index's config."""
    path = root / "config.json"
    try:
        config = json.loads(path.read_bytes())
    except FileNotFoundError:
        return  # the view below writes the index's config
    except (OSError, ValueError) as e:
        raise LayoutError(f"{path}: unreadable ({error_line(e)})") from None
    if config != index.config:
        keys = sorted(
            k
            for k in set(config if isinstance(config, dict) else {}) | set(index.config)
            if not isinstance(config, dict) or config.get(k) != index.config.get(k)
        )
        what = f"key {keys[0]!r}" if keys else "its content"
        raise LayoutError(f"{path}: differs from the config in {INDEX_FILE} ({what})")


def _listed_view(root: Path, index: Index) -> Path:
    """A directory of symlinks to the files the index lists and nothing else: mlx-lm reads the
    model config, dense weights and tokenizer from it, never an unlisted file of ``root``."""
    listed = {f.name for f in index.files}
    if not lists_tokenizer(listed):
        raise LayoutError(
            f"{root / INDEX_FILE}: lists no tokenizer ({', '.join(TOKENIZER_FILES)} or *.tiktoken)"
        )
    view = Path(tempfile.mkdtemp(prefix="flashmoe-view-"))
    atexit.register(shutil.rmtree, view, ignore_errors=True)
    for name in [DENSE_FILE, *sorted(listed)]:
        target = root.joinpath(*name.split("/"))
        if not target.is_file():
            raise LayoutError(f"{target}: missing (listed in {INDEX_FILE})")
        link = view.joinpath(*name.split("/"))
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.realpath(target), link)
    if "config.json" not in listed:
        (view / "config.json").write_text(json.dumps(index.config))
    return view


def _swap_switch_glus(model: nn.Module, make, check=None) -> list[tuple[nn.Module, int]]:
    """Replace every SwitchGLU / SwitchMLP child in ``model`` by ``make(layer, module)``; return
    (parent, layer). ``check(layers)`` sees every MoE layer first."""
    found = []
    for path, module in model.named_modules():
        for name, child in module.children().items():
            if isinstance(child, (SwitchGLU, SwitchMLP)):
                child_path = f"{path}.{name}" if path else name
                found.append((module, name, child, child_path))
    layers = []
    for *_, child_path in found:
        layer = layer_of_module_path(child_path)
        if layer is None:
            raise LayoutError(f"cannot tell the layer of MoE module {child_path}")
        layers.append(layer)
    if check is not None:
        check(layers)
    swapped = []
    for (parent, name, glu, _), layer in zip(found, layers, strict=True):
        setattr(parent, name, make(layer, glu))
        swapped.append((parent, layer))
    return swapped


class _Elsewhere(nn.Module):
    """Stands in for the SwitchGLU of a layer another rank runs (dropped by mlx-lm's pipeline
    right after loading; it owns no parameters, so nothing of that layer is read)."""

    def __init__(self, layer: int):
        super().__init__()
        self.layer = layer

    def __call__(self, x, indices):
        raise RuntimeError(f"MoE layer {self.layer} runs on another rank")


def _build_model(
    root: Path,
    view: Path,
    index: Index,
    store: ExpertStore,
    timer: Timing | None,
    k: int | None,
    group=None,
    plan: Plan | None = None,
):
    """mlx-lm's ``load_model`` (on ``view``, the listed files of ``root``) with every SwitchGLU
    swapped for a streaming one at construction; with ``group``, split by mlx-lm's pipeline
    before any weight is evaluated, so a rank reads only its own layers' dense weights."""
    parents: list[tuple[nn.Module, int]] = []
    own = None if plan is None else set(plan.stages[group.rank()].moe_layers)

    def check_layers(layers: list[int]) -> None:  # before any bank is bound
        expected = sorted(entry.layer for entry in index.layers)
        if sorted(layers) != expected:
            raise LayoutError(
                f"{root}: the model has MoE layers {sorted(layers)} but the layout has {expected}"
            )

    def streaming(layer: int, glu: SwitchGLU) -> nn.Module:
        if own is not None and layer not in own:
            return _Elsewhere(layer)
        module = StreamingSwitchGLU(layer, glu, store)
        return module if timer is None else Timed(module, timer)

    def get_classes(config: dict):
        model_class, args_class = _get_classes(config)

        class StreamingModel(model_class):
            # Swap before load_model quantizes or loads anything: no [num_experts, ...] tensor
            # is ever evaluated.
            def __init__(self, args):
                super().__init__(args)
                parents.extend(_swap_switch_glus(self, streaming, check=check_layers))

        StreamingModel.__name__ = model_class.__name__
        return StreamingModel, args_class

    model, config = load_model(view, lazy=plan is not None, get_model_classes=get_classes)
    if plan is not None:
        split_model(model, group, plan)
        mx.eval(model.parameters())
        parents = [(parent, layer) for parent, layer in parents if layer in own]
    layers = sorted(layer for _, layer in parents)
    expected = sorted(entry.layer for entry in index.layers if own is None or entry.layer in own)
    if layers != expected:
        raise LayoutError(
            f"{root}: the model has MoE layers {layers} but the layout has {expected}"
        )
    if k is not None:
        if k != index.top_k:
            if group is None or group.rank() == 0:
                print(
                    f"flashmoe: warning: routing {k} experts per token instead of {index.top_k}; "
                    "output will differ from the original model",
                    file=sys.stderr,
                )
        for parent, _ in parents:
            if not hasattr(parent, "top_k"):
                raise ValueError(f"{type(parent).__name__} has no top_k to override")
            parent.top_k = k
    link_next_layers(parents)
    commit_early(model, [parent for parent, _ in parents], store)
    return model, config


def load(
    path_or_repo: str,
    *,
    bank_experts: int | None = None,
    memory_budget_gb: float | None = None,
    cache_io_split: int = 1,
    io_threads: int | None = None,
    reader: str = "auto",
    k: int | None = None,
    verify: bool = False,
    direct_io: bool = False,
    timing: bool = False,
    max_kv_tokens: int = 8192,
    kv_sequences: int = 1,
    revision: str | None = None,
    return_config: bool = False,
    quiet: bool = True,
    trace: str | Path | None = None,
    drop_dense_cache: bool = True,
    prefetch: str | None = None,
    bank_policy: str = "lfu",
    hits_first: bool = True,
    fill_bank: bool | None = None,
    group=None,
):
    """Load a flashmoe layout as an mlx-lm ``(model, tokenizer)`` pair, its routed experts streamed.

    The non-expert (dense) weights are loaded resident; each MoE layer's ``SwitchGLU`` is replaced
    by a streaming one that reads the experts a step routes to into a bank of slots. The pair works
    with every mlx-lm tool (``generate``, ``stream_generate``, ``mlx_lm.server``'s generator).

    Args:
        path_or_repo (str): A layout directory (``~`` is expanded), or a Hugging Face Hub repo id
            ``ORG/NAME`` of a published layout: pulled into the Hub cache (only the files its
            index lists) and verified against the index once.
        bank_experts (int, optional): Expert slots per MoE layer, from the model's top-k to its
            number of experts. Default: as many as ``memory_budget_gb`` allows.
        memory_budget_gb (float, optional): Size the bank so that the dense weights, the bank, the
            KV cache (see ``max_kv_tokens``) and 256 MiB of overhead fit in this many GiB (finite,
            >= 0). Default: 75 % of physical memory. Ignored when ``bank_experts`` is given.
        cache_io_split (int): Split each expert read into this many page-aligned chunks (1..8),
            read in parallel. Default: ``1``.
        io_threads (int): Threads of the read pool (>= 1). Default: None, 16 on CUDA, 8 elsewhere.
        reader (str): ``"native"`` (the C pool, GIL released), ``"python"``, or ``"auto"`` (native
            when it was built, else Python with a notice). Default: ``"auto"``.
        k (int, optional): Routed experts per token, 1..number of experts. Fewer is faster and
            changes the output (a warning says so). Default: the model's top-k.
        verify (bool): Check every expert read against its sha256 in the index, and the dense
            weights and copied files once at load. Default: ``False``.
        direct_io (bool): Read experts around the page cache (``O_DIRECT`` on Linux, ``F_NOCACHE``
            on macOS), for cold-read measurements. Default: ``False``.
        timing (bool): Accumulate dense, router-sync and expert-compute seconds in
            ``model.flashmoe.timing`` (adds one sync per phase). Default: ``False``.
        max_kv_tokens (int): KV-cache tokens, in all, that budget sizing reserves memory for.
            Default: ``8192``.
        kv_sequences (int): Concurrent sequences that budget sizing reserves recurrent
            (linear-attention) state for. Default: ``1``.
        revision (str, optional): Hub branch, tag or commit when ``path_or_repo`` is a repo id.
            Default: the main branch.
        return_config (bool): Also return the model's config dict (as ``mlx_lm.load`` does).
            Default: ``False``.
        quiet (bool): When ``False``, print how the bank was sized to stderr. Default: ``True``.
        trace (str or Path, optional): Record the routed expert ids (and hits) of every MoE layer
            call to this file (zstd, ``flashmoe.runtime.trace``; replay it with ``flashmoe-bench
            policy``); the writer is ``model.flashmoe.store.trace``, flushed by
            ``model.flashmoe.close()``. Under a group, every rank records its own layers and
            ``close()`` gathers them into rank 0's file (``path`` on rank 0's machine).
            Default: no trace.
        drop_dense_cache (bool): Once MLX holds the dense weights, drop the dense file from the
            page cache (Linux), so those bytes are not held twice (``benchmarks/RESULTS.md``,
            "Dense weights"). Default: ``True``.
        prefetch (str): ``"off"``, ``"on"`` or ``"auto"``: while a layer computes, read the experts
            the next layer's router picks for the current hidden state (only residency changes,
            never the output; ``"auto"`` backs off when it guesses badly). Default: None,
            ``"auto"`` on CUDA and on MLX's CPU backend (measured to win there), ``"off"`` on
            Metal (not measured yet).
        bank_policy (str): Which resident expert a miss evicts: ``"lru"``, ``"lfu"`` or
            ``"lfuda"`` (``metal/policies.py``; only residency changes, never the output).
            Default: ``"lfu"`` (LFU with ageing: it read 3-22 % fewer bytes than LRU on every
            realistic trace measured, ``benchmarks/RESULTS.md``).
        hits_first (bool): In a decode step with misses, compute the resident experts while the
            misses are read (the same output where an expert's rows do not depend on the rest of
            its call; not on CUDA at real sizes, where it has no effect). Default: ``True``.
        fill_bank (bool, optional): Read every expert into the bank at load, so that no decode
            step syncs on its router (a bank of every expert only: the model then runs as stock
            mlx-lm does, from the first token). ``False`` reads each expert when first routed,
            and every MoE layer syncs on its router until all have been. Default: ``True``
            for a bank of every expert.
        group (mx.distributed.Group, optional): Split the model across the ranks of this group
            (pipeline parallel, ``mlx_lm``'s ``model.model.pipeline``): each rank runs a
            contiguous range of layers, balanced by bytes, and holds only their dense weights,
            banks and layer files. Default: MLX's global group when ``mlx.launch`` started this
            process with others (``mx.distributed.init()``), else none. mlx-lm's models talk over
            the global group, so pass that one. Every rank must call ``load`` (and then
            generate) the same way; all check they have the same layout first.

    Returns:
        ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with ``return_config``: mlx-lm's
        own model class and ``TokenizerWrapper``. ``model.flashmoe`` (``Runtime``) holds the layout
        root, its index, the expert store (``store.stats``: hits, misses, bytes read), the bank
        size, top-k, timing and the sizing note; ``model.flashmoe.close()`` closes the layer files,
        the trace and the read pool.

    Raises:
        LayoutError: ``path_or_repo`` is not a layout (or a repo that cannot be pulled:
            ``HubError``), its index or a listed file is invalid, missing or fails verification,
            its ``config.json`` differs from the index's, or mlx-lm cannot build the model or
            tokenizer from it. A ``ValueError``, like the next.
        ValueError: An argument of the wrong type or out of range (``bank_experts``, ``k``,
            ``cache_io_split``, ``io_threads``, ``reader``, ``prefetch``, ``bank_policy``), or a
            memory budget that cannot hold the dense weights, the KV cache and one token's experts
            per layer, or ``fill_bank=True`` with a bank smaller than the experts.
        RuntimeError: ``reader="native"`` where the native reader was not built.
        RankError: Under a group: a rank failed to load (its error is named), has a different
            layout, or there are more ranks than MoE layers; raised on every rank (a
            ``RuntimeError``; ``silent`` on all but rank 0).
        OSError: A file of the layout (or ``trace``) cannot be opened or read.
    """
    if io_threads is None:
        io_threads = default_io_threads()
    _check_arguments(bank_experts, memory_budget_gb, cache_io_split, io_threads, k)
    _reserve_std_fds()
    group = world(group)
    # Under a group each rank pulls only its part of a Hub layout: the index, the dense and the
    # copied files first (enough to plan the stages), then its own layer files.
    repo = _hub_repo(path_or_repo) if group is not None else None
    progress = group is None or group.rank() == 0

    def open_layout() -> tuple[Path, Index]:
        if repo is not None:  # verified with the layer files, before any weight is read
            from .hub import pull

            root = pull(repo, revision=revision, verify=False, layers=(), progress=progress)
        else:
            root = resolve_model_path(path_or_repo, revision=revision)
        index = read_index(root)
        _check_config_file(root, index)
        if verify:  # the dense weights and copied files too, not only each expert read
            from ..verify import check_copied_files

            check_copied_files(root, index, dense=True)
        return root, index

    def load_here(root: Path, index: Index, plan: Plan | None):
        if repo is not None:
            _pull_stage(repo, root, revision, plan.stages[group.rank()], progress)
        return _load_stage(
            root,
            index,
            group,
            plan,
            bank_experts=bank_experts,
            memory_budget_gb=memory_budget_gb,
            cache_io_split=cache_io_split,
            io_threads=io_threads,
            reader=reader,
            k=k,
            verify=verify,
            direct_io=direct_io,
            timing=timing,
            max_kv_tokens=max_kv_tokens,
            kv_sequences=kv_sequences,
            trace=trace,
            drop_dense_cache=drop_dense_cache,
            prefetch=prefetch,
            bank_policy=bank_policy,
            hits_first=hits_first,
            fill_bank=fill_bank,
            progress=progress and not quiet,
        )

    if group is None:
        model, tokenizer, config = load_here(*open_layout(), None)
    else:
        # Every rank checks its own copy of the layout, then all compare (by the index's bytes)
        # before any weight is read; a failure anywhere stops every rank.
        root, index = agree(
            group,
            open_layout,
            identity=lambda v: (v[0] / INDEX_FILE).read_bytes(),
            compared=f"{INDEX_FILE} ",
            what="checking that every rank has the same layout",
        )
        try:
            plan = plan_stages(root, index, group.size())
        except ValueError as e:  # the same on every rank: rank 0 says it
            raise RankError(error_line(e), silent=group.rank() != 0) from None
        model, tokenizer, config = agree(
            group,
            lambda: load_here(root, index, plan),
            discard=lambda v: v[0].flashmoe.close(),
            what="waiting for the other ranks to load",
        )
    if not quiet and model.flashmoe.rank == 0:
        print(f"flashmoe: {model.flashmoe.budget_note}", file=sys.stderr)
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


def _load_stage(
    root: Path,
    index: Index,
    group,
    plan: Plan | None,
    *,
    bank_experts: int | None,
    memory_budget_gb: float | None,
    cache_io_split: int,
    io_threads: int,
    reader: str,
    k: int | None,
    verify: bool,
    direct_io: bool,
    timing: bool,
    max_kv_tokens: int,
    kv_sequences: int,
    trace,
    drop_dense_cache: bool,
    prefetch: str | None,
    bank_policy: str,
    hits_first: bool,
    fill_bank: bool | None,
    progress: bool = False,
):
    """``load`` on this process: all the layout's layers, or this rank's stage of ``plan``."""
    tc = text_config(index.config)
    stage = None if plan is None else plan.stages[group.rank()]
    moe_layers = len(index.layers) if stage is None else len(stage.moe_layers)
    top_k = index.top_k if k is None else k
    if not 1 <= top_k <= index.num_experts:
        raise ValueError(f"--k {top_k} is not in 1..{index.num_experts} (experts per layer)")
    if not 1 <= cache_io_split <= MAX_SPLIT:
        raise ValueError(f"cache-io-split must be in 1..{MAX_SPLIT}, got {cache_io_split}")

    dense_bytes = index.dense.size
    kv_bytes = kv_cache_bytes(tc, max_kv_tokens, kv_sequences)
    if stage is not None:  # this rank's share: its layers' dense weights and cache
        dense_bytes = plan.shared_bytes + stage.dense_bytes
        layers = tc.get("num_hidden_layers") or 1
        kv_bytes = -(-kv_bytes * (stage.stop - stage.start) // layers)
    if bank_experts is not None:
        if not top_k <= bank_experts <= index.num_experts:
            raise ValueError(
                f"bank of {bank_experts} experts cannot hold one token's {top_k} experts "
                f"(allowed: {top_k}..{index.num_experts})"
            )
        slots, note = bank_experts, f"bank: {bank_experts} experts per layer (asked)"
    else:
        asked = memory_budget_gb is not None
        budget = int(memory_budget_gb * GiB) if asked else default_budget(physical_memory())
        slots = slots_for_budget(
            budget,
            dense_bytes=dense_bytes,
            kv_bytes=kv_bytes,
            expert_bytes=index.expert_bytes,
            moe_layers=max(1, moe_layers),
            num_experts=index.num_experts,
            min_slots=top_k,
        )
        what = f"budget {budget / GiB:.2f} GiB" if asked else "75% of RAM"
        note = (
            f"bank: {slots} of {index.num_experts} experts per layer "
            f"({slots * moe_layers * index.expert_bytes / GiB:.2f} GiB) from {what}"
        )
    if plan is not None:
        note = f"{plan.describe()}; rank {stage.rank} {note}"
    io = make_reader(reader, threads=io_threads)
    try:
        store = ExpertStore(
            root,
            index,
            io,
            slots=slots,
            split=cache_io_split,
            verify=verify,
            direct=direct_io,
            prefetch=prefetch,
            policy=bank_policy,
            hits_first=hits_first,
            layers=None if stage is None else stage.moe_layers,
        )
    except BaseException:
        io.close()
        raise
    timer = Timing() if timing else None
    try:
        view = _listed_view(root, index)
        try:
            model, config = _build_model(root, view, index, store, timer, k, group, plan)
            tokenizer = load_tokenizer(view, eos_token_ids=config.get("eos_token_id", None))
        except (LayoutError, OSError):
            raise
        except Exception as e:  # mlx-lm / transformers on a config they cannot use
            text = " ".join(str(e).split())[:300] or type(e).__name__
            raise LayoutError(
                f"{root}: mlx-lm failed to build the model or tokenizer "
                f"({type(e).__name__}: {text})"
            ) from None
    except BaseException:
        store.close()
        raise
    set_limits(dense_bytes + slots * moe_layers * index.expert_bytes)
    if drop_dense_cache:
        _drop_page_cache(root / index.dense.name)
    try:
        store.trace = _trace_writer(trace, root, index, slots, top_k, group) if trace else None
    except BaseException:
        store.close()
        raise
    if fill_bank is None:
        fill_bank = slots >= index.num_experts
    if fill_bank:
        try:
            seconds = store.fill(progress)
        except BaseException:
            store.close()
            raise
        note += f"; every expert read at load ({seconds:.1f} s)"
    model.flashmoe = Runtime(root, index, store, slots, top_k, timer, note, group, plan)
    return model, tokenizer, config


def _drop_page_cache(path: Path) -> None:
    """Drop ``path`` from the page cache where the OS has the hint (Linux); a no-op elsewhere."""
    from .reader import advise_dontneed

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        advise_dontneed(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _trace_writer(path, root: Path, index: Index, slots: int, top_k: int, group=None):
    """The routing trace's writer; on a rank other than 0 it writes a temporary file, which
    ``Runtime.close`` hands to rank 0 (``path`` may be the same file on every machine)."""
    from .trace import TraceWriter

    meta = {"model": root.name, "slots": slots, "expert_bytes": index.expert_bytes}
    if group is not None:  # the header is rank 0's: its bank; every rank records its layers
        meta["ranks"] = group.size()
        if group.rank() != 0:
            fd, path = tempfile.mkstemp(prefix=f"flashmoe-trace-rank{group.rank()}-")
            os.close(fd)
            atexit.register(_unlink, path)
    layers = max(entry.layer for entry in index.layers) + 1
    return TraceWriter(
        path, num_layers=layers, num_experts=index.num_experts, top_k=top_k, meta=meta
    )


def _unlink(path: str | Path) -> None:
    Path(path).unlink(missing_ok=True)


def _gather_trace(group, path: Path, gather: bool) -> None:
    """Rank 0 appends the other ranks' traces to its own; the others delete theirs."""
    from .group import gather_bytes
    from .trace import append_trace

    rank = group.rank()
    try:
        if gather:
            mine = b"" if rank == 0 else path.read_bytes()
            parts = gather_bytes(group, mine, "collecting the routing trace")
            if rank == 0:
                for part in parts[1:]:
                    append_trace(path, part)
    finally:
        if rank != 0:
            _unlink(path)
