"""``flashmoe-bench synth``: synthetic mlx-community checkpoints with real Qwen3.5 layer geometry.

The model is mlx-lm's own class, built from a config.json laid out like the published one but
with fewer layers (and optionally a smaller vocabulary). Its parameters are never evaluated as a
whole: mlx-lm's init and ``quantize_model`` run lazily only to get the exact key names, shapes,
dtypes and the config's quantization block; each tensor is then drawn chunk by chunk (uniform
weights at mlx-lm's init scale, norms at 1, so activations stay finite), quantized per chunk with
the module's bits/group size, and written shard by shard with ``mx.save_safetensors`` under
mlx-lm's greedy 5 GiB shard rule and file names. Peak memory is about one shard.

With ``--routing realistic`` (the default) the embedding, the routers and the input/final norms carry
``bench.routing``'s design, which reproduces the published expert popularity (per-layer LRU hit
rates); ``--routing uniform`` leaves the routers random (near-uniform routing).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx_lm.utils as lm_utils
from mlx.utils import tree_flatten, tree_map_with_path

from ..fixtures import write_tokenizer
from .routing import PROFILES, RoutingDesign

GEOMETRY = {
    # hidden, heads, kv heads, experts, top-k, moe I, shared I, GDN key heads, value heads
    "qwen3.5-397b": (4096, 32, 2, 512, 10, 1024, 1024, 16, 64, 60),
    "qwen3.5-122b": (3072, 32, 2, 256, 8, 1024, 1024, 16, 64, 48),
    "qwen3.5-35b": (2048, 16, 2, 256, 8, 512, 512, 16, 32, 40),
}
PRESETS = tuple(GEOMETRY)
ROUTINGS = ("realistic", "uniform")
REAL_VOCAB = 248320
CHUNK_FLOATS = 16 << 20  # float32 values drawn per chunk (64 MiB)


def preset_config(preset: str, layers: int, vocab: int = REAL_VOCAB) -> dict:
    """config.json of ``preset`` (Qwen3.5 MoE as published, before quantization) with ``layers``."""
    if preset not in GEOMETRY:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    if layers < 1:
        raise ValueError("--layers must be >= 1")
    if vocab < 512:
        raise ValueError("--vocab must be >= 512")
    hidden, heads, kv, experts, top_k, moe_i, shared_i, lk, lv, _ = GEOMETRY[preset]
    # mlx-lm needs one full-attention layer: below 4 layers the last layer is the full one.
    interval = min(4, layers)
    layer_types = [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
    ]
    text = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_output_gate": True,
        "dtype": "bfloat16",
        "eos_token_id": 248044,
        "full_attention_interval": interval,
        "head_dim": 256,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "layer_types": layer_types,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128,
        "linear_num_key_heads": lk,
        "linear_num_value_heads": lv,
        "linear_value_head_dim": 128,
        "max_position_embeddings": 262144,
        "mlp_only_layers": [],
        "model_type": "qwen3_5_moe_text",
        "moe_intermediate_size": moe_i,
        "mtp_num_hidden_layers": 1,
        "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": heads,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "output_router_logits": False,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "mrope_interleaved": True,
            "mrope_section": [11, 11, 10],
            "partial_rotary_factor": 0.25,
            "rope_theta": 10000000,
            "rope_type": "default",
        },
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": shared_i,
        "use_cache": True,
        "vocab_size": vocab,
    }
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
    }


@dataclass
class Tensor:
    """One saved tensor: how to draw it (``source`` float shape, or a small lazy array)."""

    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype
    nbytes: int
    quant: tuple[int, int] | None = None  # (bits, group_size) of the module that owns it
    float_shape: tuple[int, ...] | None = None
    lazy: mx.array | None = None


def small_config(preset: str, layers: int, vocab: int, expert_intermediate: int) -> dict:
    """``preset_config`` with the preset's routing geometry (experts, top-k) but a small model:
    hidden size 1024, few heads, experts (and the shared expert) of ``expert_intermediate``;
    for runs where routing matters and matmul time does not (tests, trace benchmarks)."""
    config = preset_config(preset, layers, vocab=vocab)
    config["text_config"].update(
        hidden_size=1024,
        moe_intermediate_size=expert_intermediate,
        shared_expert_intermediate_size=expert_intermediate,
        num_attention_heads=4,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    return config


def _plan(config: dict, dtype: mx.Dtype, seed: int = 0) -> tuple[list[Tensor], dict, int]:
    """Tensors (in mlx-lm's parameter order), the quantized config and mlx-lm's parameter count."""
    model_class, args_class = lm_utils._get_classes(config)
    mx.random.seed(seed)  # mlx-lm's init draws the small non-quantized tensors (A_log, conv1d)
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    float_shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    cast = getattr(model, "cast_predicate", lambda _: True)
    model.update(
        tree_map_with_path(
            lambda k, v: v.astype(dtype) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
            model.parameters(),
        )
    )
    with contextlib.redirect_stdout(io.StringIO()):
        model, qconfig = lm_utils.quantize_model(model, config, 64, 4)
    q = qconfig["quantization"]
    default = (q["bits"], q["group_size"])
    flat = tree_flatten(model.parameters())
    names = {k for k, _ in flat}
    tensors = []
    for k, v in flat:
        module = k.rsplit(".", 1)[0]
        t = Tensor(k, tuple(v.shape), v.dtype, v.nbytes)
        if f"{module}.scales" in names and k.endswith((".weight", ".scales", ".biases")):
            over = q.get(module)
            t.quant = (over["bits"], over["group_size"]) if isinstance(over, dict) else default
            t.float_shape = float_shapes[f"{module}.weight"]
        else:
            t.lazy = v
        tensors.append(t)
    return tensors, qconfig, lm_utils.get_total_parameters(model)


def _uniform(name: str, shape: tuple[int, ...], bound: float, seed: int, chunk: int) -> mx.array:
    key = mx.random.key((zlib.crc32(name.encode()) * 1000003 + seed * 7919 + chunk) % (1 << 63))
    return mx.random.uniform(-bound, bound, shape, key=key)


def _draw_quantized(
    t: Tensor, scale_dtype: mx.Dtype, seed: int, design: RoutingDesign | None = None
) -> dict[str, mx.array]:
    """weight/scales/biases of a quantized module, drawn and quantized in row chunks."""
    shape = t.float_shape
    assert shape is not None and t.quant is not None
    bits, group = t.quant
    fan_in = shape[-1]
    embedding = ".embed_tokens." in t.name
    bound = math.sqrt(3.0 / fan_in) if embedding else 1.0 / math.sqrt(fan_in)
    rows = shape[0]
    per_row = math.prod(shape[1:])
    step = max(1, CHUNK_FLOATS // per_row)
    parts: dict[str, list[mx.array]] = {"weight": [], "scales": [], "biases": []}
    module = t.name.rsplit(".", 1)[0]
    for i, start in enumerate(range(0, rows, step)):
        n = min(step, rows - start)
        w = _uniform(module, (n, *shape[1:]), bound, seed, i)
        if design is not None:
            w = design.adjust(module, start, w)
        wq, s, b = mx.quantize(w, group_size=group, bits=bits)
        s, b = s.astype(scale_dtype), b.astype(scale_dtype)
        mx.eval(wq, s, b)
        parts["weight"].append(wq)
        parts["scales"].append(s)
        parts["biases"].append(b)
    out = {}
    for k, v in parts.items():
        a = v[0] if len(v) == 1 else mx.concatenate(v, axis=0)
        mx.eval(a)
        out[f"{module}.{k}"] = a
    return out


def _shards(tensors: list[Tensor], max_bytes: int) -> list[list[Tensor]]:
    """mlx-lm's greedy ``make_shards`` rule."""
    shards: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        if not shards or size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def synthesize(
    out: str | Path,
    preset: str,
    layers: int,
    *,
    vocab: int = REAL_VOCAB,
    dtype: str = "bfloat16",
    seed: int = 0,
    shard_gb: float = 5.0,
    progress: bool = True,
    routing: str = "realistic",
    config: dict | None = None,
) -> Path:
    """Write a synthetic checkpoint of ``preset`` with ``layers`` layers to ``out``; return it.

    ``routing="realistic"`` designs the routers for the preset's published routing statistics
    (``bench.routing``); ``"uniform"`` leaves them random (near-uniform routing). ``config``
    replaces the preset's config.json (tests use tiny ones; routing still follows ``preset``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not hasattr(mx, dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    target = getattr(mx, dtype)
    if routing not in ROUTINGS:
        raise ValueError(f"unknown routing {routing!r} (known: {', '.join(ROUTINGS)})")
    config = copy.deepcopy(config) if config else preset_config(preset, layers, vocab)
    text = config.get("text_config", config)
    design = None
    if routing == "realistic":
        profile = PROFILES.get(preset, PROFILES["qwen3.5-397b"])
        design = RoutingDesign(profile, text["num_experts"], text["hidden_size"], seed)
    tok_dir = out
    write_tokenizer(tok_dir, vocab_size=min(vocab, 4096))
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    config["text_config"]["eos_token_id"] = eos[-1]  # <|endoftext|> (248044 in the real vocabulary)
    tensors, qconfig, nparams = _plan(config, target, seed)
    shards = _shards(tensors, int(shard_gb * (1 << 30)))
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        name = fmt.format(i + 1, len(shards))
        arrays: dict[str, mx.array] = {}
        wanted = {t.name for t in shard}
        for t in shard:
            if t.name in arrays:
                continue
            if t.quant is not None:
                drawn = _draw_quantized(t, target, seed, design)
                arrays.update({k: v for k, v in drawn.items() if k in wanted})
            else:
                assert t.lazy is not None
                if design is not None:
                    t.lazy = design.norm(t.name, t.lazy)
                mx.eval(t.lazy)
                arrays[t.name] = t.lazy
                t.lazy = None
        ordered = {t.name: arrays[t.name] for t in shard}
        mx.save_safetensors(str(out / name), ordered, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(ordered, name))
        del arrays, ordered
        mx.clear_cache()
        if progress:
            print(
                f"synth: {name} ({sum(t.nbytes for t in shard) / 1e9:.2f} GB, "
                f"{time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
            )
    index = {
        "metadata": {
            "total_size": sum(t.nbytes for t in tensors),
            "total_parameters": nparams,
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    lm_utils.save_config(qconfig, config_path=out / "config.json")
    return out


def check_loads(path: str | Path, tokens: int = 4) -> bool:
    """Load ``path`` with stock ``mlx_lm.load`` and check a short forward pass gives finite logits."""
    import mlx_lm

    model, tok = mlx_lm.load(str(path))
    ids = tok.encode("The quick brown fox")[:tokens] or [0]
    logits = model(mx.array([ids]))
    ok = bool(mx.all(mx.isfinite(logits)).item())
    del model
    return ok


__all__ = ["PRESETS", "check_loads", "preset_config", "synthesize"]


def add_arguments(p) -> None:
    p.add_argument("--preset", required=True, choices=sorted(GEOMETRY))
    p.add_argument("--layers", type=int, required=True, help="decoder layers (the real: 40-60)")
    p.add_argument("--vocab", type=int, default=REAL_VOCAB, help="vocabulary (default 248320)")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float16", "float32"),
        help="scales/biases/norms dtype (mlx-community: bfloat16; float32 decodes ~10x faster "
        "on MLX CPU)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--routing",
        choices=ROUTINGS,
        default="realistic",
        help="realistic: routers reproduce the published expert popularity (LRU hit rates); "
        "uniform: random routers (a bank of X%% hits ~X%%)",
    )
    p.add_argument("--shard-gb", type=float, default=5.0, help="shard size (mlx-lm: 5)")
    p.add_argument("-o", "--out", required=True, help="checkpoint directory to write")
    p.add_argument("--layout", help="converted layout directory (default OUT.layout)")
    p.add_argument("--no-convert", action="store_true", help="write the checkpoint only")
    p.add_argument("--no-check", action="store_true", help="skip loading it with stock mlx_lm.load")
    p.add_argument("--quiet", action="store_true")


def run(args) -> int:
    import os
    import subprocess

    from .report import BenchError

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BenchError(f"{out}: exists and is not empty")
    try:
        synthesize(
            out,
            args.preset,
            args.layers,
            vocab=args.vocab,
            dtype=args.dtype,
            seed=args.seed,
            shard_gb=args.shard_gb,
            progress=not args.quiet,
            routing=args.routing,
        )
    except ValueError as e:
        raise BenchError(str(e)) from None
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"checkpoint: {out} ({size / 1e9:.2f} GB)")
    if not args.no_check:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if size > ram // 2:
            print("check: skipped (too large to load resident with mlx_lm.load)")
        elif not check_loads(out):
            raise BenchError(f"{out}: stock mlx_lm.load gives non-finite logits")
        else:
            print("check: stock mlx_lm.load loads it; logits are finite")
    if not args.no_convert:
        layout = Path(args.layout) if args.layout else out.with_name(out.name + ".layout")
        cmd = [sys.executable, "-m", "flashmoe.convert.cli", str(out), "-o", str(layout)]
        if args.quiet:
            cmd.append("--quiet")
        if subprocess.run(cmd).returncode != 0:
            raise BenchError(f"flashmoe-convert {out} -o {layout} failed")
        print(f"layout: {layout}")
    return 0
