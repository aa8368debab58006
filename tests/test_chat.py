"""flashmoe-chat: a real terminal session (pexpect) and the session logic against stock mlx-lm."""

from __future__ import annotations

import io
import os
import sys

import mlx_lm
import pexpect
import pytest
from flashmoe.runtime.chat import GREY, RESET, ChatSession, ThinkingPrinter, build_parser

P1, P2 = "Hello world", "What is the capital of France?"

_refs: dict = {}


def stock_answer(src, messages: list[dict], max_tokens: int) -> str:
    """What stock mlx-lm answers (greedy) to the rendered conversation."""
    if str(src) not in _refs:
        _refs[str(src)] = mlx_lm.load(str(src))
    model, tok = _refs[str(src)]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    return "".join(
        r.text for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=max_tokens)
    )


def _said(child) -> str:
    """What the child printed up to the next prompt, minus the echoed input line."""
    child.expect("\r\n> ")
    text = child.before.replace("\r\n", "\n")
    return text.split("\n", 1)[1] if "\n" in text else ""


def test_terminal_two_turns_reset_stats_and_ctrl_c(layout):
    src, out = layout("qwen3_5_moe")
    n = 12
    first = stock_answer(src, [{"role": "user", "content": P1}], n)
    second = stock_answer(
        src,
        [
            {"role": "user", "content": P1},
            {"role": "assistant", "content": first},
            {"role": "user", "content": P2},
        ],
        n,
    )
    child = pexpect.spawn(
        sys.executable,
        ["-m", "flashmoe.runtime.chat", str(out), "--bank-experts", "6", "--max-tokens", str(n)],
        encoding="utf-8",
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1"),
        dimensions=(50, 200),
    )
    try:
        child.expect("/reset")
        child.expect("> ")
        child.sendline(P1)
        assert _said(child) == first
        child.sendline(P2)
        assert _said(child) == second
        child.sendline("/stats")
        stats = _said(child)
        for field in ("tok/s", "bank hit rate", "MB read per token", "session:"):
            assert field in stats
        child.sendline("/reset")
        assert "new conversation" in _said(child)
        child.sendline(P1)
        assert _said(child) == first  # the history is gone
        child.sendline("/nope")
        assert "unknown command" in _said(child)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_keeps_the_session(layout):
    from test_cli import default_sigint

    src, out = layout("qwen3_5_moe")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "flashmoe.runtime.chat", str(out), "--max-tokens", "4000"],
        encoding="utf-8",
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1"),
        preexec_fn=default_sigint,
    )
    try:
        child.expect("> ")
        child.sendline("Tell me a long story")
        child.expect("Tell me a long story\r\n.")  # the answer has started streaming
        child.sendintr()
        child.expect(r"\[interrupted\]")
        child.expect("> ")
        child.sendline(P2)
        assert _said(child)  # answers the next question in the same session
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


# ---- the session in-process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def session(layout):
    from flashmoe.runtime import load

    src, out = layout("qwen3_5_moe")
    model, tok = load(str(out), bank_experts=6)
    return src, ChatSession(model, tok, build_parser().parse_args([str(out)]))


def test_second_turn_reuses_the_kv_cache_and_matches_mlx_lm(session):
    src, s = session
    s.reset()
    s.args.max_tokens = 1  # a one-token answer re-renders as the same token: the cache extends
    first = io.StringIO()
    s.reply(P1, first, "")
    cached = list(s.cached)
    s.args.max_tokens = 12
    second = io.StringIO()
    s.reply(P2, second, "")
    full = s.tokenizer.apply_chat_template(s.messages[:-1], add_generation_prompt=True)
    assert full[: len(cached)] == cached
    assert s.last.prompt_tokens == len(full) - len(cached)  # only the new tokens were prefilled
    messages = [
        {"role": "user", "content": P1},
        {"role": "assistant", "content": first.getvalue()[:-1]},
        {"role": "user", "content": P2},
    ]
    assert second.getvalue() == stock_answer(src, messages, 12) + "\n"
    assert "MB read per token" in s.stats_lines()[0]


def test_thinking_printer_styles_think_blocks():
    out = io.StringIO()
    p = ThinkingPrinter(out, "<think>", "</think>", GREY)
    for chunk in ("Hi <th", "ink>hmm", "</thi", "nk>Answer <", "b>"):
        p.write(chunk)
    p.close()
    assert out.getvalue() == f"Hi {GREY}<think>hmm</think>{RESET}Answer <b>"
    out = io.StringIO()
    p = ThinkingPrinter(out, "<think>", "</think>", GREY, thinking=True)  # template opened it
    p.write("plan")
    p.write("</think>done")
    p.close()
    assert out.getvalue() == f"{GREY}plan</think>{RESET}done"
    out = io.StringIO()
    p = ThinkingPrinter(out, None, None, "")
    p.write("<think>x")
    p.close()
    assert out.getvalue() == "<think>x"


def test_cli_errors_are_one_line(tmp_path):
    import subprocess

    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.chat", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1
    assert lines[0].startswith("flashmoe-chat: error:") and "missing" in lines[0]
