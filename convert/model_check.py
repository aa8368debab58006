"""Refuse a checkpoint that stock mlx-lm could not load (before converting it).

``mlx_lm.utils.load_model(src, lazy=True, strict=True)`` builds the model from ``config.json``,
applies its quantization and matches every tensor name and shape of the shards against the
model's parameters, without evaluating a weight (MLX loads safetensors lazily); the tokenizer is
loaded too. While ``sanitize`` runs, a probe records which checkpoint tensor each parameter is
(renamed, or ``mx.stack``-ed from per-expert tensors) and which it discards. A ``quantization``
entry MLX would crash on (``group_size`` 0) is refused first. A config mlx-lm cannot build, an
extra dense tensor or a missing MoE layer is refused here, with one line, rather than converted
into a layout that fails (or misbehaves) at run time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.nn as nn

from .errors import ConvertError

_MAX = 400


def _one_line(e: BaseException) -> str:
    """The whole message on one line; long lists cut at a comma, never inside a name."""
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > _MAX:
        cut = text.rfind(", ", 0, _MAX)
        text = text[: cut if cut > 0 else _MAX] + ", ..."
    return text


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' warnings about the source config are not the converter's business."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_quantization(config: dict, where: Path) -> None:
    """``quantization`` values MLX would divide by or crash on (group_size 0: SIGFPE)."""
    q = config.get("quantization")
    if q is None:
        return
    if not isinstance(q, dict):
        raise ConvertError(where, "quantization must be an object")
    entries = [("quantization", q)] + [
        (f"quantization[{k!r}]", v) for k, v in q.items() if isinstance(v, dict)
    ]
    for name, entry in entries:
        for key, lo, hi in (("group_size", 1, 1 << 20), ("bits", 1, 8)):
            if key in entry or entry is q:
                v = entry.get(key)
                if not _is_int(v) or not lo <= v <= hi:
                    raise ConvertError(where, f"{name} {key} {v!r} is not an integer in {lo}..{hi}")
        if not isinstance(entry.get("mode", "affine"), str):
            raise ConvertError(where, f"{name} mode must be a string")
    for k, v in q.items():
        if k not in ("group_size", "bits", "mode") and not isinstance(v, (bool, dict)):
            raise ConvertError(where, f"quantization[{k!r}] must be an object or a boolean")


@dataclass
class LoadedModel:
    """mlx-lm's model of a checkpoint (lazy: no weight evaluated) and where its weights come from."""

    model: nn.Module
    # model parameter name -> the checkpoint tensor it is, or None where mlx-lm's ``sanitize``
    # computed it from other tensors (a cast, a transpose, a split, a concatenation...)
    sources: dict[str, str | None]
    # checkpoint tensors mlx-lm's ``sanitize`` discards (a vision tower, MTP layers), where it
    # is sure: sanitize only renamed, stacked and discarded, and gives the same result without them
    unused: list[str]
    # model parameter name -> the checkpoint tensors ``sanitize`` ``mx.stack``-ed into it, in
    # order (per-expert tensors: expert e's slice of the parameter is tensor e, byte for byte)
    stacked: dict[str, list[str]] = field(default_factory=dict)
    # model parameters ``sanitize`` stacked from arrays it computed first (a cast, a transpose)
    stacked_computed: set[str] = field(default_factory=set)


def mlx_lm_module(config: dict) -> str:
    """The mlx-lm model module (``mlx_lm/models/<name>.py``) that builds ``config``'s model,
    mapped as mlx-lm maps model types; the model type itself if mlx-lm has none."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, _ = _get_classes(config)
    except Exception:  # mlx-lm raises ValueError for an unknown type, others for odd configs
        return str(config.get("model_type"))
    return model_class.__module__.rsplit(".", 1)[-1]


@contextmanager
def _recording_stacks(calls: list) -> Iterator[None]:
    """Record every ``mx.stack(arrays, axis)`` as ``(result, arrays, axis)`` while active.

    The arrays stay referenced in ``calls``, so their ``id``s are not reused while it lives.
    """
    import mlx.core as mx

    stack = mx.stack

    def recording(arrays, axis=0, **kwargs):
        arrays = list(arrays)
        result = stack(arrays, axis, **kwargs)
        calls.append((result, arrays, axis))
        return result

    # sanitize calls mx.stack through the module, so swapping it for the call sees each stack's
    # inputs and axis (the lazy graph shows neither the axis nor which input is which key)
    mx.stack = recording
    try:
        yield
    finally:
        mx.stack = stack


def _record(loaded: LoadedModel, originals: dict, out: dict, calls: list) -> set[str]:
    """Fill ``loaded`` from one ``sanitize(originals) -> out`` that made the ``mx.stack``
    ``calls``; return the checkpoint keys ``out`` is made of."""
    by_id = {id(v): k for k, v in originals.items()}
    stacks = {id(r): (arrays, axis) for r, arrays, axis in calls}
    used: set[str] = set()
    for k, v in out.items():
        if id(v) in by_id:
            loaded.sources[k] = by_id[id(v)]
            used.add(by_id[id(v)])
            continue
        arrays, axis = stacks.get(id(v), ([], None))
        names = [by_id[id(a)] for a in arrays if id(a) in by_id]
        if arrays and axis == 0 and len(names) == len(arrays):
            loaded.stacked[k] = names
            used.update(names)
        else:
            loaded.sources[k] = None
            if arrays:
                loaded.stacked_computed.add(k)
    return used


def _probing_classes(loaded: LoadedModel):
    """``get_model_classes`` for ``load_model`` that records in ``loaded`` what ``sanitize`` did
    to each key: renamed (the same array), ``mx.stack``-ed (per-expert tensors), discarded, or
    anything else (computed)."""
    from mlx_lm.utils import _get_classes

    def get_classes(config: dict):
        model_class, args_class = _get_classes(config)
        has_own = hasattr(model_class, "sanitize")

        class Probe(model_class):
            def sanitize(self, weights):
                def run(w: dict) -> dict:
                    return super(Probe, self).sanitize(w) if has_own else w

                originals = dict(weights)  # holds every array, so no id below is reused
                calls: list = []
                with _recording_stacks(calls):
                    out = run(weights)
                used = _record(loaded, originals, out, calls)
                if None not in loaded.sources.values():
                    discarded = [k for k in originals if k not in used]
                    again = run({k: v for k, v in originals.items() if k in used})
                    if discarded and again.keys() == out.keys():
                        loaded.unused.extend(sorted(discarded))
                return out

        Probe.__name__ = model_class.__name__
        return Probe, args_class

    return get_classes


def check_mlx_lm_loads(src: Path, config: dict, *, tokenizer: bool = True) -> LoadedModel:
    """mlx-lm's lazily loaded model of the checkpoint ``src``; ConvertError naming
    ``src/config.json`` if mlx-lm cannot load it. ``tokenizer``: load the tokenizer too."""
    from mlx_lm.utils import load_model, load_tokenizer

    _check_quantization(config, src / "config.json")
    loaded = LoadedModel(None, {}, [])  # type: ignore[arg-type]
    try:
        loaded.model, _ = load_model(
            src, lazy=True, strict=True, get_model_classes=_probing_classes(loaded)
        )
        if tokenizer:
            with _quiet_transformers():
                load_tokenizer(src)  # transformers reads config.json too, with its own type checks
    except Exception as e:  # mlx-lm raises ValueError, TypeError, KeyError, ZeroDivisionError...
        raise ConvertError(
            src / "config.json",
            f"mlx-lm cannot load this checkpoint ({type(e).__name__}: {_one_line(e)})",
        ) from None
    return loaded
