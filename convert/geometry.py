"""Find a checkpoint's routed experts in mlx-lm's own model of it, and plan their records.

The expert tensors are the parameters of the model's ``SwitchGLU`` / ``SwitchMLP`` modules, as
mlx-lm builds and quantizes them from ``config.json`` (so the quantization of every projection is
mlx-lm's reading of the config, not ours). Each parameter is traced back through the model's
``sanitize`` to the checkpoint tensor it is; one that ``sanitize`` computes from others cannot be
copied byte-exact and is refused.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU, SwitchMLP

from ..layouts import Component, family_named, record_size
from ..layouts.dtypes import DTYPES
from ..layouts.families import GLU_PROJECTIONS, MLP_PROJECTIONS, layer_of_module_path, top_k_of
from ..layouts.index import record_version
from .errors import ConvertError
from .model_check import LoadedModel, check_mlx_lm_loads, mlx_lm_module
from .safetensors_source import Checkpoint, TensorInfo

V1_MODULE = ".switch_mlp"  # version 1 keys: <source_prefix>.switch_mlp.<component>


def _dtype_names() -> dict:
    import mlx.core as mx

    return {getattr(mx, d.mlx): name for name, d in DTYPES.items() if d.mlx}


_DTYPE_NAMES = _dtype_names()


@dataclass
class MoeLayer:
    layer: int
    prefix: str  # source_prefix of the index (FORMAT.md: its meaning depends on the version)
    # the source tensors in component order: per component one stacked [N, ...] tensor, or the
    # N per-expert tensors mlx-lm's sanitize stacks into it, in expert order
    tensors: list[TensorInfo]


@dataclass
class ExpertPlan:
    model_type: str
    num_experts: int
    top_k: int
    components: list[Component]
    expert_bytes: int
    layers: list[MoeLayer]
    dense: list[TensorInfo]  # every other tensor mlx-lm uses, sorted by name
    version: int = 1  # the layout format version the records need
    unused: list[str] = field(default_factory=list)  # tensors left out: mlx-lm discards them

    def record_size(self, alignment: int) -> int:
        return record_size(self.expert_bytes, alignment)


def check_family(ckpt: Checkpoint) -> str:
    """The mlx-lm module of a supported family; ConvertError naming config.json otherwise."""
    where = ckpt.path / "config.json"
    model_type = ckpt.config.get("model_type")
    if not isinstance(model_type, str):
        raise ConvertError(where, f"model_type {model_type!r} is not a string")
    module = mlx_lm_module(ckpt.config)
    try:
        family_named(module, model_type)
    except ValueError as e:
        raise ConvertError(where, str(e)) from None
    if not any(_quantization_blocks(ckpt.config)):
        raise ConvertError(where, f"unsupported quantization: {_NOT_QUANTIZED}")
    return module


_NOT_QUANTIZED = (
    "no 'quantization' block (flashmoe repacks quantized MLX checkpoints, e.g. from "
    "mlx_lm.convert -q)"
)


def _quantization_blocks(config: dict) -> list:
    text = config.get("text_config")
    text = text if isinstance(text, dict) else {}
    return [config.get("quantization"), config.get("quantization_config")] + [
        text.get("quantization_config")
    ]


def _switch_modules(model) -> list[tuple[int, str, object]]:
    """``(layer, path, module)`` of every SwitchGLU / SwitchMLP in ``model``, by layer."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, (SwitchGLU, SwitchMLP)):
            found.append((layer_of_module_path(path), path, module))
    return found


@dataclass
class _Piece:
    """One component's source: a stacked ``[N, ...]`` tensor, or one tensor per expert."""

    name: str  # <projection>.<part>
    tensors: tuple[TensorInfo, ...]
    per_expert: bool
    bits: int
    group_size: int
    mode: str


def _per_expert(ckpt: Checkpoint, key: str, names: list[str], param, where) -> tuple:
    """The checkpoint tensors ``sanitize`` stacked into ``key``, checked to be its slices: same
    dtype, each the shape of one slice (so expert e's bytes are tensor e's bytes)."""
    missing = [n for n in names if n not in ckpt.tensors]
    if missing:
        raise ConvertError(where, f"expert tensor {missing[0]} is in no listed shard")
    tensors = tuple(ckpt.tensors[n] for n in names)
    want = (_DTYPE_NAMES.get(param.dtype), tuple(param.shape[1:]))
    odd = [t for t in tensors if (t.dtype, t.shape) != want]
    if odd:
        # name the tensor unlike the others (mx.stack promoted them all to its dtype)
        common = Counter((t.dtype, t.shape) for t in tensors).most_common(1)[0][0]
        t = next((t for t in odd if (t.dtype, t.shape) != common), odd[0])
        raise ConvertError(
            ckpt.path / t.file,
            f"tensor {t.name}: {t.dtype}{list(t.shape)} is not one expert's slice of "
            f"{key} ({want[0]}{list(param.shape)}) that mlx-lm's sanitize stacks it into",
        )
    return tensors


def _projection(ckpt: Checkpoint, loaded: LoadedModel, path: str, proj: str, lin, where):
    """The ``_Piece`` of every part of one projection."""
    if not isinstance(lin, QuantizedSwitchLinear):
        raise ConvertError(where, f"unsupported quantization: {path}.{proj} is not quantized")
    parts = ["weight", "scales"]
    if lin.get("biases") is not None:
        parts.append("biases")
    if lin.get("global_scale") is not None:
        parts.append("global_scale")
    if "bias" in lin:
        parts.append("bias")
    out = []
    q = (lin.bits, lin.group_size, lin.mode)
    for part in parts:
        key = f"{path}.{proj}.{part}"
        if key in loaded.stacked:
            tensors = _per_expert(ckpt, key, loaded.stacked[key], lin[part], where)
            out.append(_Piece(f"{proj}.{part}", tensors, True, *q))
            continue
        source = loaded.sources.get(key)
        if source is None:
            how = (
                "stacked by mlx-lm's sanitize from arrays it first computed from the "
                "checkpoint's tensors (a view, a cast, a transpose...)"
                if key in loaded.stacked_computed
                else "computed by mlx-lm's sanitize from other tensors (a concatenation, a "
                "split, a cast, a transpose...)"
            )
            raise ConvertError(
                where,
                f"expert tensor {key} is {how}, so it cannot be copied byte-exact; "
                "convert the checkpoint with mlx_lm.convert first",
            )
        if source not in ckpt.tensors:
            raise ConvertError(where, f"expert tensor {source} is in no listed shard")
        out.append(_Piece(f"{proj}.{part}", (ckpt.tensors[source],), False, *q))
    return out


def _layer_plan(ckpt: Checkpoint, loaded: LoadedModel, layer: int, path: str, module, where):
    projections = GLU_PROJECTIONS if isinstance(module, SwitchGLU) else MLP_PROJECTIONS
    pieces: list[_Piece] = []
    for proj in projections:
        pieces += _projection(ckpt, loaded, path, proj, getattr(module, proj), where)
    names = {f"{path}.{p.name}" for p in pieces}
    params = (f"{path}.{k}" for k, _ in tree_flatten(module.parameters()))
    extra = sorted(k for k in params if k not in names)
    if extra:
        raise ConvertError(
            where, f"expert module {path} has parameters flashmoe does not stream ({extra[0]})"
        )
    first = pieces[0]
    num_experts = len(first.tensors) if first.per_expert else first.tensors[0].shape[0]
    comps, offset = [], 0
    prefixes = set()
    for p in pieces:
        t = p.tensors[0]
        if p.per_expert:
            if len(p.tensors) != num_experts:
                raise ConvertError(
                    ckpt.path / t.file,
                    f"tensor {t.name}: mlx-lm's sanitize stacks {len(p.tensors)} tensors into "
                    f"{path}.{p.name}, not one per expert of {num_experts}",
                )
            # no stacked tensor to name: the key the stacked checkpoint would hold
            prefixes.add(path)
            shape, nbytes = list(t.shape), t.nbytes
        else:
            if not t.shape or t.shape[0] != num_experts or t.nbytes % num_experts:
                raise ConvertError(
                    ckpt.path / t.file,
                    f"tensor {t.name}: shape {list(t.shape)} is not one slice per expert of "
                    f"{num_experts}",
                )
            if not t.name.endswith("." + p.name):
                raise ConvertError(
                    ckpt.path / t.file, f"tensor {t.name}: expected a name ending in .{p.name}"
                )
            prefixes.add(t.name[: -len(p.name) - 1])
            shape, nbytes = list(t.shape[1:]), t.nbytes // num_experts
        comps.append(
            Component(p.name, t.dtype, shape, offset, nbytes, p.bits, p.group_size, p.mode)
        )
        offset += nbytes
    if len(prefixes) != 1:
        raise ConvertError(where, f"layer {layer}: expert tensors have several key prefixes")
    return num_experts, comps, prefixes.pop(), [t for p in pieces for t in p.tensors]


def plan_experts(ckpt: Checkpoint, loaded: LoadedModel | None = None) -> ExpertPlan:
    """Find the MoE layers in mlx-lm's model of ``ckpt``, check them, split off the dense tensors.

    ``loaded``: the model from ``check_mlx_lm_loads`` (loaded here when not given).
    """
    where = ckpt.path / "config.json"
    check_family(ckpt)
    if loaded is None:
        loaded = check_mlx_lm_loads(ckpt.path, ckpt.config)
    top_k = top_k_of(ckpt.config)
    if top_k is None:
        raise ConvertError(where, "config has no positive integer num_experts_per_tok")
    switches = _switch_modules(loaded.model)
    if not switches:
        raise ConvertError(ckpt.path, "no MoE layers: mlx-lm's model has no SwitchGLU/SwitchMLP")
    unplaced = [path for layer, path, _ in switches if layer is None]
    if unplaced:
        raise ConvertError(where, f"cannot tell the decoder layer of expert module {unplaced[0]}")
    switches.sort(key=lambda s: s[0])
    layers, components, num_experts, first = [], None, None, None
    for layer, path, module in switches:
        if layers and layers[-1].layer == layer:
            raise ConvertError(where, f"layer {layer} has two expert modules")
        experts, comps, prefix, tensors = _layer_plan(ckpt, loaded, layer, path, module, where)
        if components is None:
            components, num_experts, first = comps, experts, layer
        elif comps != components or experts != num_experts:
            raise ConvertError(
                where,
                f"layer {layer} has a different expert geometry or quantization than layer "
                f"{first}; one layout needs one geometry",
            )
        layers.append(MoeLayer(layer, prefix, tensors))
    assert components is not None and num_experts is not None
    if top_k > num_experts:
        raise ConvertError(where, f"num_experts_per_tok {top_k} > num_experts {num_experts}")
    version = record_version(components)
    if version == 1 and all(e.prefix.endswith(V1_MODULE) for e in layers):
        for e in layers:
            e.prefix = e.prefix.removesuffix(V1_MODULE)
    else:
        version = 2
    left_out = {t.name for e in layers for t in e.tensors} | set(loaded.unused)
    dense = [ckpt.tensors[k] for k in sorted(ckpt.tensors) if k not in left_out]
    return ExpertPlan(
        ckpt.config["model_type"],
        num_experts,
        top_k,
        components,
        sum(c.nbytes for c in components),
        layers,
        dense,
        version,
        loaded.unused,
    )


def shards_held(sizes: dict[str, int]) -> int:
    """The most shard bytes a streamed conversion holds at once: the two largest of the shards
    to fetch (``sizes``), one being repacked while the next downloads; a layer whose experts
    span more shards is written a shard at a time (``stream_parts``), so it holds no more."""
    return sum(sorted(sizes.values())[-2:])


def unused_summary(names: list[str]) -> str:
    """``vision_tower (245), model.layers.61 (12)``: tensor counts by top-level module (by layer
    under ``model``/``language_model``)."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        depth = 3 if parts[0] in ("model", "language_model") else 1
        key = ".".join(parts[:depth])
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in counts.items())
