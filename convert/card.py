"""The model card (README.md) written next to a layout, rendered by ``huggingface_hub.ModelCard``."""

from __future__ import annotations

from ..layouts import INDEX_FILE, Index

DEFAULT_LICENSE = "apache-2.0"


def license_from_readme(readme: str | None) -> str | None:
    """The ``license`` of a model card's YAML metadata, if it has a readable one."""
    from huggingface_hub import ModelCard

    if not readme or not readme.startswith("---"):  # no metadata block: nothing to read
        return None
    try:
        lic = ModelCard(readme, ignore_metadata_errors=True).data.license
    except Exception:  # malformed YAML: the card is the source's, not ours to refuse
        return None
    return lic if isinstance(lic, str) and lic else None


def model_card(
    index: Index,
    *,
    license: str | None = None,
    source_readme: str | None = None,
    hub_repo: str | None = None,
    base_model: str | None = None,
) -> str:
    """README.md for a layout: Hub metadata, how to run it, and a summary of the layout.

    ``license`` wins; else the source card's metadata; else apache-2.0. ``hub_repo`` is the
    repo the layout is published to (``flashmoe-publish``): the run instructions name it.
    ``base_model``: the Hub repo the checkpoint came from, where the index cannot tell (a local
    copy); it replaces the index's origin.
    """
    from huggingface_hub import ModelCard, ModelCardData

    src = index.source or {}
    repo_id, revision = src.get("repo_id"), src.get("revision")
    if base_model and base_model != repo_id:
        repo_id, revision = base_model, None  # the recorded revision is of another origin
    data = ModelCardData(
        base_model=repo_id or None,
        base_model_relation="quantized" if repo_id else None,
        license=license or license_from_readme(source_readme) or DEFAULT_LICENSE,
        library_name="mlx",
        tags=["mlx", "moe", "flashmoe", index.model_type],
        pipeline_tag="text-generation",
    )
    name = repo_id.split("/")[-1] if repo_id else index.model_type
    total = (
        sum(entry.size for entry in index.layers)
        + index.dense.size
        + sum(f.size for f in index.files)
    )
    expert_bytes = sum(e.size for e in index.layers)
    comp = index.components[0]
    origin = f"[{repo_id}](https://huggingface.co/{repo_id})" if repo_id else "a local checkpoint"
    rev = f" at revision `{revision}`" if revision else ""
    target = hub_repo or "<this-directory-or-repo>"
    run = f"""```sh
pip install flashmoe
flashmoe-run {target} --prompt "Hello" --max-tokens 64
```
"""
    if hub_repo:
        run += f"""
`flashmoe-run` downloads the layout into the Hugging Face cache and verifies every checksum before
its first use. To download only: `flashmoe-pull {hub_repo} [--local-dir DIR]`.
"""
    body = f"""
# {name} (flashmoe layout)

This is {origin}{rev} repacked by [flashmoe](https://pypi.org/project/flashmoe/) so that its
routed experts can be streamed from SSD: a Mixture-of-Experts model larger than RAM runs with only
the dense weights and the experts in use in memory. Every weight is byte-identical to the source;
nothing was dequantized or requantized.

## Run

{run}
## Layout

| | |
|---|---|
| format | `{index.format}` version {index.version} (`{INDEX_FILE}`) |
| model type | `{index.model_type}` |
| MoE layers | {len(index.layers)} |
| experts per layer / routed per token | {index.num_experts} / {index.top_k} |
| quantization of the experts | {comp.mode}, {comp.bits}-bit, group size {comp.group_size} |
| bytes per expert / record size / alignment | {index.expert_bytes:,} / {index.record_size:,} / {index.alignment:,} |
| expert bytes / total bytes | {expert_bytes:,} / {total:,} |

Each MoE layer is one file `experts/layer-NNN.bin`; expert `e` is the record at byte
`e * record_size`. The non-expert weights are in `model-dense.safetensors` (original names).
`{INDEX_FILE}` describes everything and holds a sha256 checksum of every expert record and of every
other file; `flashmoe-convert verify <dir>` checks them.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))
