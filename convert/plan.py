"""``flashmoe-convert --plan SRC``: what the layout of a checkpoint will be, before any download.

For a Hub repo only the file list, ``config.json`` and the safetensors headers are fetched, into a
sparse replica (``remote.py``) that the converter's own code reads as it reads a download. Nothing
here is a second parser of either format.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..hubio import is_repo_id
from ..layouts import DEFAULT_ALIGNMENT, copied_files, text_config
from ..sizing import GiB, default_budget, kv_cache_bytes, physical_memory, slots_for_budget
from .errors import ConvertError
from .geometry import check_family, plan_experts, shards_held
from .model_check import check_mlx_lm_loads
from .remote import list_files, write_replica
from .safetensors_source import open_checkpoint
from .source import aux_files
from .stream import SMALL_PATTERNS
from .writers import dense_size

RAM_SIZES_GB = (32, 48, 64, 96, 128, 192)
KV_TOKENS = 8192  # flashmoe-run's default KV reservation (load(max_kv_tokens=...))
UNKNOWNS = (
    "not known before running: routing locality (how often a token's experts are already in the "
    "bank, which sets the hit rate) and the SSD's read speed; together they set tokens/s"
)
# what a conversion records besides the layout while it runs (OUT/.flashmoe-convert): a record
# per finished layer file, with a sha256 per expert ('"<64 hex>", '), and the source's files
# with their sizes and sha256; plus slack for the Hub cache's refs and lock files
RECORD_BYTES_PER_EXPERT, RECORD_BYTES_PER_FILE, RECORD_SLACK = 68, 160, 4096


@dataclass
class MemoryRow:
    """The bank ``flashmoe-run`` gives by default (75 % of RAM) on a machine of ``ram_bytes``."""

    ram_bytes: int
    this_machine: bool
    bank_experts: int | None  # per MoE layer; None: not even top-k experts fit
    resident_share: float  # of each layer's experts


@dataclass
class LayoutPlan:
    source: str
    model_type: str
    moe_layers: int
    num_experts: int
    top_k: int
    quantization: str
    expert_bytes: int
    record_size: int
    alignment: int
    layer_file_bytes: int
    dense_bytes: int
    layout_bytes: int
    source_bytes: int
    shards: int
    largest_shards_bytes: int  # what a streamed conversion holds at most: the two largest shards
    kept_files_bytes: int  # small files kept meanwhile: config, tokenizer, weight index, records
    disk_full_download: int  # checkpoint + layout
    disk_streaming: int  # layout + largest_shards_bytes + kept_files_bytes
    memory: list[MemoryRow] = field(default_factory=list)
    unknowns: str = UNKNOWNS

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def describe(self) -> str:
        h = _human
        lines = [
            f"{self.source}: {self.model_type}, {self.moe_layers} MoE layers x {self.num_experts} "
            f"experts, top-{self.top_k}, experts {self.quantization}",
            f"  bytes per expert {self.expert_bytes:,}; record {self.record_size:,} "
            f"(alignment {self.alignment:,})",
            f"  layer files: {self.moe_layers} x {h(self.layer_file_bytes)} "
            f"(experts/layer-NNN.bin)",
            f"  dense weights: {h(self.dense_bytes)}; layout: {h(self.layout_bytes)}",
            f"  checkpoint: {h(self.source_bytes)} in {self.shards} shard(s)",
            f"  disk needed: {h(self.disk_full_download)} downloading the whole "
            f"checkpoint, {h(self.disk_streaming)} streaming it (layout + the two "
            f"largest shards, held at once, + {h(self.kept_files_bytes)} of small files)",
            "  bank per MoE layer with flashmoe-run's default budget (75 % of RAM, "
            f"{KV_TOKENS} tokens of KV cache):",
        ]
        for row in self.memory:
            ram = f"{row.ram_bytes / GiB:.0f} GiB" + (" (this machine)" if row.this_machine else "")
            if row.bank_experts is None:
                lines.append(f"    {ram:>22}: does not fit (not even {self.top_k} experts)")
            else:
                lines.append(
                    f"    {ram:>22}: {row.bank_experts} of {self.num_experts} experts "
                    f"({row.resident_share:.0%} resident)"
                )
        lines.append(f"  {self.unknowns}")
        return "\n".join(lines)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def memory_rows(
    config: dict, *, dense: int, expert_bytes: int, layers: int, experts: int, top_k: int
) -> list[MemoryRow]:
    """The default bank for this machine's RAM and for RAM_SIZES_GB (the runtime's own rule)."""
    kv = kv_cache_bytes(text_config(config), KV_TOKENS)
    rams = [(physical_memory(), True)] + [(n * GiB, False) for n in RAM_SIZES_GB]
    rows = []
    for ram, here in rams:
        try:
            slots = slots_for_budget(
                default_budget(ram),
                dense_bytes=dense,
                kv_bytes=kv,
                expert_bytes=expert_bytes,
                moe_layers=layers,
                num_experts=experts,
                min_slots=top_k,
            )
        except ValueError:
            slots = None
        rows.append(MemoryRow(ram, here, slots, (slots or 0) / experts))
    return rows


def kept_files(files: dict[str, int], shards: int, layers: int, experts: int) -> int:
    """What a streamed conversion keeps on disk besides the layout and the shards: the small
    files of the repo (``files``: name -> size) in the Hub cache, and its records."""
    small = [n for n in files if any(fnmatch.fnmatch(n, p) for p in SMALL_PATTERNS)]
    records = layers * experts * RECORD_BYTES_PER_EXPERT
    records += (len(small) + shards) * RECORD_BYTES_PER_FILE
    return sum(files[n] for n in small) + records + RECORD_SLACK


def plan_layout(
    src: str | os.PathLike,
    *,
    revision: str | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    progress: bool = True,
) -> LayoutPlan:
    """The plan for converting ``src`` (a checkpoint directory or a Hub repo id), no download."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise ConvertError(path, "not a directory")
        return _plan_directory(path, str(path), alignment, None)
    if not is_repo_id(str(src)):
        raise ConvertError(src, "no such directory (and not a Hugging Face repo id)")
    with tempfile.TemporaryDirectory(prefix="flashmoe-plan-") as tmp:
        files = list_files(str(src), revision)
        write_replica(str(src), revision, files, Path(tmp), progress)
        try:
            sizes = {name: f.size for name, f in files.items()}
            return _plan_directory(Path(tmp), str(src), alignment, sizes)
        except ConvertError as e:  # name the repo, not the temporary directory
            raise ConvertError(e.file.replace(tmp, str(src)), e.problem) from None


def _plan_directory(
    directory: Path, name: str, alignment: int, remote: dict[str, int] | None
) -> LayoutPlan:
    """``remote``: the sizes of a Hub repo's files, whose ``directory`` holds only the headers."""
    ckpt = open_checkpoint(directory)
    check_family(ckpt)
    plan = plan_experts(ckpt, check_mlx_lm_loads(directory, ckpt.config, tokenizer=False))
    rec = plan.record_size(alignment)
    layer_bytes = plan.num_experts * rec
    dense = dense_size(plan.dense)
    if remote is None:
        aux = sum(os.path.getsize(directory / n) for n in aux_files(directory))
        shard_sizes = [s.size for s in ckpt.shards]
        files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    else:
        aux = sum(remote[n] for n in copied_files(remote))
        shard_sizes = [remote.get(s.name, s.size) for s in ckpt.shards]
        files = remote
    layout = len(plan.layers) * layer_bytes + dense + aux
    sizes = sorted(shard_sizes, reverse=True)
    held = shards_held(dict(zip((s.name for s in ckpt.shards), shard_sizes, strict=True)))
    kept = kept_files(files, len(sizes), len(plan.layers), plan.num_experts)
    source = sum(sizes) + aux
    comp = plan.components[0]
    quant = f"{comp.mode} {comp.bits}-bit" + (
        f", group {comp.group_size}" if comp.group_size else ""
    )
    return LayoutPlan(
        source=name,
        model_type=plan.model_type,
        moe_layers=len(plan.layers),
        num_experts=plan.num_experts,
        top_k=plan.top_k,
        quantization=quant,
        expert_bytes=plan.expert_bytes,
        record_size=rec,
        alignment=alignment,
        layer_file_bytes=layer_bytes,
        dense_bytes=dense,
        layout_bytes=layout,
        source_bytes=source,
        shards=len(sizes),
        largest_shards_bytes=held,
        kept_files_bytes=kept,
        disk_full_download=source + layout,
        disk_streaming=layout + held + kept,
        memory=memory_rows(
            ckpt.config,
            dense=dense,
            expert_bytes=plan.expert_bytes,
            layers=len(plan.layers),
            experts=plan.num_experts,
            top_k=plan.top_k,
        ),
    )
