"""Test and demo fixtures: MoE checkpoints written exactly as ``mlx_lm.convert`` does.

Used by ``flashmoe-run --demo``, the tests and the benchmarks (product code may import this module,
never the benchmarks).

mlx-lm's own model classes with their random init, cast to the target dtype through the model's
``cast_predicate``, quantized by ``mlx_lm.utils.quantize_model`` (the model's ``quant_predicate``),
and saved by ``mlx_lm.utils.save_model`` / ``save_config``. The only change is the shard size: tiny
models are sharded every few hundred KiB so that expert tensors of one layer land in different shards.
"""

from __future__ import annotations

import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.utils
import mlx_lm.utils as lm_utils
from mlx.utils import tree_map_with_path

FAMILY_CONFIGS = ("qwen3_5_moe", "qwen3_5_moe_flat", "qwen3_moe", "qwen3_next")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route each token to a few "
    "experts. Streaming experts from a solid state disk lets a laptop run a model larger than its memory. "
    "Hello world! What is the capital of France? Paris is the capital of France. 0123456789 "
    "def main():\n    print('hello')\n{\"key\": [1, 2, 3]}\n"
)


def tiny_text_config(
    family: str,
    *,
    hidden: int = 128,
    moe_intermediate: int = 128,
    num_experts: int = 16,
    top_k: int = 4,
    num_layers: int = 4,
    vocab_size: int = 512,
) -> dict:
    """A small but complete config.json for ``family`` (see FAMILY_CONFIGS)."""
    if family in ("qwen3_5_moe", "qwen3_5_moe_flat", "qwen3_next"):
        text = {
            "model_type": "qwen3_5_moe_text" if family.startswith("qwen3_5") else "qwen3_next",
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "linear_num_value_heads": 4,
            "linear_num_key_heads": 2,
            "linear_key_head_dim": 32,
            "linear_value_head_dim": 32,
            "linear_conv_kernel_dim": 4,
            "tie_word_embeddings": False,
            "full_attention_interval": 4,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "decoder_sparse_step": 1,
            "shared_expert_intermediate_size": moe_intermediate,
            "moe_intermediate_size": moe_intermediate,
            "norm_topk_prob": True,
            "mlp_only_layers": [],
            "attn_output_gate": True,
        }
        if family == "qwen3_next":
            text.update(rope_theta=10000000.0, partial_rotary_factor=0.25)
            return text
        text["rope_parameters"] = {
            "type": "default",
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
        }
        if family == "qwen3_5_moe_flat":
            return dict(text, model_type="qwen3_5_moe")
        return {
            "model_type": "qwen3_5_moe",
            "architectures": ["Qwen3_5MoeForConditionalGeneration"],
            "text_config": text,
            "tie_word_embeddings": False,
        }
    if family == "qwen3_moe":
        return {
            "model_type": "qwen3_moe",
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "rms_norm_eps": 1e-6,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "num_experts": num_experts,
            "num_experts_per_tok": top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "moe_intermediate_size": moe_intermediate,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,
            "norm_topk_prob": True,
        }
    raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILY_CONFIGS)})")


def write_tokenizer(path: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer (``tokenizers``) with Qwen-style special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "model_max_length": 4096,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    eos = tok.token_to_id("<|endoftext|>")
    im_end = tok.token_to_id("<|im_end|>")
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [im_end, eos], "do_sample": False}, indent=2)
    )


def _random_if_zero(_, v: mx.array) -> mx.array:
    if mx.issubdtype(v.dtype, mx.floating) and v.size and not mx.any(v).item():
        # a router's logits spread over ~1, score-correction biases well below that
        scale = v.shape[-1] ** -0.5 if v.ndim > 1 else 0.01
        return (scale * mx.random.normal(v.shape)).astype(v.dtype)
    return v


@contextmanager
def _shard_size(max_bytes: int):
    """Make mlx-lm's save_model shard every ``max_bytes`` (its greedy rule, in bytes not GiB)."""
    original = lm_utils.make_shards

    def make_shards(weights: dict, max_file_size_gb: int = 0) -> list:
        shards, size = [], 0
        for k, v in weights.items():
            if not shards or size + v.nbytes > max_bytes:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += v.nbytes
        return shards

    lm_utils.make_shards = make_shards
    try:
        yield
    finally:
        lm_utils.make_shards = original


def make_checkpoint(
    path: str | Path,
    family: str = "qwen3_5_moe",
    *,
    bits: int | None = 4,
    group_size: int | None = 64,
    mode: str = "affine",
    global_scale: bool = False,
    randomize_zeros: bool = False,
    dtype: str = "bfloat16",
    shard_bytes: int = 256 * 1024,
    seed: int = 0,
    config: dict | None = None,
    **config_kwargs,
) -> Path:
    """Write a random-weight MoE checkpoint in mlx-community format to ``path``; return the path.

    ``family`` is one of FAMILY_CONFIGS (``qwen3_5_moe_flat`` = qwen3_5_moe with ``model.layers.N``
    keys and a flat config). ``config`` overrides the tiny default config entirely;
    ``config_kwargs`` go to ``tiny_text_config``. ``mode``/``global_scale`` as in
    ``mlx_lm.convert --q-mode`` (``bits``/``group_size`` None: the mode's defaults).
    ``randomize_zeros``: draw every all-zero float parameter (routers and score biases that
    mlx-lm initialises to zeros, expert linear biases) at random, so that tokens route apart.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config or tiny_text_config(family, **config_kwargs))
    tc = config.get("text_config", config)
    mx.random.seed(seed)
    model_class, args_class = lm_utils._get_classes(config)
    model = model_class(args_class.from_dict(config))

    target = getattr(mx, dtype)
    cast_predicate = getattr(model, "cast_predicate", lambda _: True)

    def set_dtype(k, v):
        if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
            return v.astype(target)
        return v

    model.update(tree_map_with_path(set_dtype, model.parameters()))
    if randomize_zeros:
        model.update(tree_map_with_path(_random_if_zero, model.parameters()))
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        model, config = lm_utils.quantize_model(
            model, config, group_size, bits, mode=mode, global_scale=global_scale
        )
    mx.eval(model.parameters())

    if family == "qwen3_5_moe_flat":
        # Text-only repos keep `model.layers.N...` keys; mlx-lm's sanitize adds `language_model.`.
        flat = {
            k.removeprefix("language_model."): v
            for k, v in mlx.utils.tree_flatten(model.parameters())
        }
        model.parameters = lambda: mlx.utils.tree_unflatten(list(flat.items()))  # type: ignore[method-assign]

    with _shard_size(shard_bytes):
        lm_utils.save_model(path, model)
    lm_utils.save_config(config, config_path=path / "config.json")
    write_tokenizer(path, vocab_size=tc.get("vocab_size", 512))
    return path


# How older checkpoints name expert e's projections, per family: mlx-lm's sanitize stacks
# ``<layer>.<moe>.experts.<e>.<name>.<part>`` into ``<layer>.<moe>.switch_mlp.<proj>.<part>``.
PER_EXPERT_NAMES = {
    "mixtral": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
    "phimoe": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"},
}
_STACKED = re.compile(r"(.*)\.switch_mlp\.(\w+)\.(\w+)$")


def write_per_expert(src: str | Path, dst: str | Path, *, shard_bytes: int = 256 * 1024) -> Path:
    """Rewrite the checkpoint ``src`` into ``dst`` with its stacked ``switch_mlp`` tensors split
    into one tensor per expert, named as the family's sanitize expects them (the inverse of its
    ``mx.stack``; ``experts.<e>.<projection>`` unless PER_EXPERT_NAMES says otherwise), keys sorted and sharded greedily every ``shard_bytes`` as ``make_checkpoint``
    shards; the other files are copied. Returns ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    renames = PER_EXPERT_NAMES.get(config["model_type"], {})
    weights: dict[str, mx.array] = {}
    for shard in sorted(src.glob("model*.safetensors")):
        weights.update(mx.load(str(shard)))
    for key in [k for k in weights if _STACKED.match(k)]:
        prefix, proj, part = _STACKED.match(key).groups()  # type: ignore[union-attr]
        stacked = weights.pop(key)
        for e in range(stacked.shape[0]):
            weights[f"{prefix}.experts.{e}.{renames.get(proj, proj)}.{part}"] = stacked[e]
    with _shard_size(shard_bytes):
        shards = lm_utils.make_shards({k: weights[k] for k in sorted(weights)})
    name = "model-{:05d}-of-{:05d}.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards):
        file = name.format(i + 1, len(shards))
        mx.save_safetensors(str(dst / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}}
    index["weight_map"] = dict(sorted(weight_map.items()))
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    for p in src.iterdir():
        if p.is_file() and not p.name.startswith("model"):
            shutil.copy(p, dst / p.name)
    return dst
