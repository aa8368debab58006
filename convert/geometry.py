"""Work out what a checkpoint's routed experts look like and check it against config.json."""

from __future__ import annotations

from dataclasses import dataclass

from ..layouts import COMPONENTS, Component, family_for, record_size, text_config
from ..layouts.families import match_expert_key
from .errors import ConvertError
from .safetensors_source import Checkpoint, TensorInfo

SCALE_DTYPES = ("BF16", "F16", "F32")


@dataclass
class MoeLayer:
    layer: int
    prefix: str  # e.g. "language_model.model.layers.3.mlp"
    tensors: list[TensorInfo]  # the nine stacked tensors, in COMPONENTS order


@dataclass
class ExpertPlan:
    model_type: str
    num_experts: int
    top_k: int
    components: list[Component]
    expert_bytes: int
    layers: list[MoeLayer]
    dense: list[TensorInfo]  # every other tensor, sorted by name

    def record_size(self, alignment: int) -> int:
        return record_size(self.expert_bytes, alignment)


def _int_field(cfg: dict, names: tuple[str, ...], where: str) -> int:
    for n in names:
        v = cfg.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    raise ConvertError(where, f"config has no positive integer {' / '.join(names)}")


def quantization_for(config: dict, module_path: str, where: str) -> tuple[int, int, str]:
    """``(bits, group_size, mode)`` of one module, following mlx-lm's reading of the block."""
    q = config.get("quantization")
    if not isinstance(q, dict):
        raise ConvertError(
            where,
            "unsupported quantization: no 'quantization' block (flashmoe repacks quantized MLX "
            "checkpoints, e.g. from mlx_lm.convert -q)",
        )
    # Per-path overrides use mlx-lm module paths, which carry "language_model." for the
    # multimodal families even when the checkpoint's keys do not.
    for path in (
        module_path,
        "language_model." + module_path,
        module_path.removeprefix("language_model."),
    ):
        override = q.get(path)
        if override is False:
            raise ConvertError(where, f"unsupported quantization: {path} is not quantized")
        if isinstance(override, dict):
            # mlx.nn.quantize passes the dict to to_quantized, whose defaults are 64 / 4 / affine.
            return (
                override.get("bits", 4),
                override.get("group_size", 64),
                override.get("mode", "affine"),
            )
    bits, group_size = q.get("bits"), q.get("group_size")
    if not isinstance(bits, int) or not isinstance(group_size, int):
        raise ConvertError(where, f"unsupported quantization: block lacks bits/group_size ({q!r})")
    return bits, group_size, q.get("mode", "affine")


def _expected_shapes(out_dim: int, in_dim: int, bits: int, group_size: int) -> tuple:
    return (out_dim, in_dim * bits // 32), (out_dim, in_dim // group_size)


def _layer_components(
    ckpt: Checkpoint, layer: MoeLayer, num_experts: int, hidden: int, inter: int, where: str
) -> list[Component]:
    dims = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    comps, offset = [], 0
    for name, t in zip(COMPONENTS, layer.tensors, strict=True):
        proj, part = name.split(".")
        bits, group_size, mode = quantization_for(
            ckpt.config, f"{layer.prefix}.switch_mlp.{proj}", where
        )
        if mode != "affine":
            raise ConvertError(
                where,
                f"unsupported quantization: mode {mode!r} for {layer.prefix}.switch_mlp.{proj} "
                "(only affine is supported)",
            )
        if bits not in (2, 3, 4, 5, 6, 8) or group_size <= 0:
            raise ConvertError(
                where, f"unsupported quantization: bits={bits} group_size={group_size}"
            )
        out_dim, in_dim = dims[proj]
        w_shape, s_shape = _expected_shapes(out_dim, in_dim, bits, group_size)
        want_dtype = "U32" if part == "weight" else t.dtype
        want_shape = (num_experts, *(w_shape if part == "weight" else s_shape))
        if part != "weight" and t.dtype not in SCALE_DTYPES:
            raise ConvertError(
                ckpt.path / t.file,
                f"tensor {t.name}: dtype {t.dtype} is not a quantization scale dtype",
            )
        if t.dtype != want_dtype or t.shape != want_shape:
            raise ConvertError(
                ckpt.path / t.file,
                f"tensor {t.name} is {t.dtype}{list(t.shape)}, but config.json ({bits}-bit, group "
                f"{group_size}, {num_experts} experts, hidden {hidden}, moe_intermediate {inter}) "
                f"implies {want_dtype}{list(want_shape)}: unsupported quantization or wrong config",
            )
        nbytes = t.nbytes // num_experts
        comps.append(
            Component(name, t.dtype, list(t.shape[1:]), offset, nbytes, bits, group_size, mode)
        )
        offset += nbytes
    return comps


def plan_experts(ckpt: Checkpoint) -> ExpertPlan:
    """Find the MoE layers, check their geometry and quantization, split off the dense tensors."""
    where = str(ckpt.path / "config.json")
    try:
        family = family_for(ckpt.config)
    except ValueError as e:
        raise ConvertError(where, str(e)) from None
    tc = text_config(ckpt.config)
    num_experts = _int_field(tc, ("num_experts",), where)
    top_k = _int_field(tc, ("num_experts_per_tok",), where)
    hidden = _int_field(tc, ("hidden_size",), where)
    inter = _int_field(tc, ("moe_intermediate_size",), where)
    if top_k > num_experts:
        raise ConvertError(where, f"num_experts_per_tok {top_k} > num_experts {num_experts}")

    found: dict[int, dict[str, TensorInfo]] = {}
    prefixes: dict[int, str] = {}
    dense = []
    for name in sorted(ckpt.tensors):
        t = ckpt.tensors[name]
        m = match_expert_key(family, name)
        if m is None:
            if ".switch_mlp." in name:
                raise ConvertError(
                    ckpt.path / t.file, f"tensor {name}: unexpected routed-expert tensor"
                )
            dense.append(t)
            continue
        layer, prefix, component = m
        if prefixes.setdefault(layer, prefix) != prefix:
            raise ConvertError(
                ckpt.path / t.file, f"tensor {name}: layer {layer} has two key prefixes"
            )
        found.setdefault(layer, {})[component] = t
    if not found:
        raise ConvertError(
            ckpt.path,
            f"no MoE layers: no '...layers.N.mlp.switch_mlp.*' tensors for {family.model_type}",
        )
    layers = []
    for layer in sorted(found):
        missing = [c for c in COMPONENTS if c not in found[layer]]
        if missing:
            raise ConvertError(
                ckpt.path, f"layer {layer}: missing {prefixes[layer]}.switch_mlp.{missing[0]}"
            )
        layers.append(MoeLayer(layer, prefixes[layer], [found[layer][c] for c in COMPONENTS]))

    components = None
    for entry in layers:
        comps = _layer_components(ckpt, entry, num_experts, hidden, inter, where)
        if components is None:
            components = comps
        elif comps != components:
            raise ConvertError(
                where,
                f"layer {entry.layer} has a different expert geometry or quantization than layer "
                f"{layers[0].layer}; one layout needs one geometry",
            )
    assert components is not None
    expert_bytes = sum(c.nbytes for c in components)
    return ExpertPlan(
        family.model_type, num_experts, top_k, components, expert_bytes, layers, dense
    )
