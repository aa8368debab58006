"""Checks of an OpenAI-style request body that stock ``mlx_lm.server`` leaves to chance.

Out-of-range ``logit_bias`` ids crash MLX, ``top_k`` above the vocabulary kills the generation
thread, and NaN, infinities, booleans-as-numbers, unknown roles and non-text content are
accepted. ``check_request`` raises ValueError with a one-line message (answered with 400).
"""

from __future__ import annotations

import math
import re

ROLES = ("system", "user", "assistant", "tool")
_INT_KEY = re.compile(r"-?[0-9]{1,20}")
_SEED_MAX = 2**64 - 1


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(name: str, v, lo: float | None = None, hi: float | None = None) -> None:
    if not _is_number(v):
        raise ValueError(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if lo is not None and hi is None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")


def _integer(name: str, v, lo: int, hi: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{name} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {v}")


def check_logit_bias(bias, vocab: int) -> dict[int, float] | None:
    """``logit_bias`` as ``{token id: bias}``, every id in ``0 <= id < vocab``."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise ValueError("logit_bias must be an object of token id to bias")
    if len(bias) > vocab:
        raise ValueError(f"logit_bias has {len(bias)} entries; the vocabulary has {vocab}")
    out = {}
    for key, value in bias.items():
        if not isinstance(key, str) or not _INT_KEY.fullmatch(key):
            raise ValueError(f"logit_bias key {key!r} is not a token id")
        token = int(key)
        if not 0 <= token < vocab:
            raise ValueError(f"logit_bias token id {token} is not in 0..{vocab - 1}")
        _number(f"logit_bias[{key}]", value, -100, 100)
        out[token] = float(value)
    return out


def _check_content(i: int, message: dict) -> None:
    content = message.get("content")
    if isinstance(content, str):
        return
    if content is None and message["role"] == "assistant" and message.get("tool_calls"):
        return
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return
    raise ValueError(
        f"messages[{i}].content must be a string (or a list of text parts), "
        f"got {type(content).__name__}"
    )


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        _check_content(i, m)


def check_request(h, body: dict, chat: bool, vocab: int) -> None:
    """Check the sampling values the handler ``h`` read from ``body`` and the body's prompt."""
    _integer("max_tokens", h.max_tokens, 1, 2**31)
    _number("temperature", h.temperature, 0, None)
    _number("top_p", h.top_p, 0, 1)
    _number("min_p", h.min_p, 0, 1)
    _integer("top_k", h.top_k, 0, vocab)
    _number("repetition_penalty", h.repetition_penalty, 0, None)
    _number("presence_penalty", h.presence_penalty)
    _number("frequency_penalty", h.frequency_penalty)
    for name in ("repetition_context_size", "presence_context_size", "frequency_context_size"):
        _integer(name, getattr(h, name), 0, 2**31)
    _number("xtc_probability", h.xtc_probability, 0, 1)
    _number("xtc_threshold", h.xtc_threshold, 0, 1)
    if h.seed is not None:
        _integer("seed", h.seed, 0, _SEED_MAX)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings")
    tools = body.get("tools")
    if tools is not None and not (
        isinstance(tools, list) and all(isinstance(t, dict) for t in tools)
    ):
        raise ValueError("tools must be a list of objects")
    if chat:
        check_messages(body.get("messages"))
        mapping = body.get("role_mapping")
        if mapping is not None and not (
            isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values())
        ):
            raise ValueError("role_mapping must be an object of strings")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
