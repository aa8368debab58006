"""Bad command-line values and inputs of flashmoe-run / -chat: one line, never a traceback, and a
chat keeps its conversation through a read error or a line that is not UTF-8."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pexpect
import pytest
from flashmoe.runtime import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "-1"], "--seed -1 is not in 0..18446744073709551615"),
        (["--temp", "-1"], "--temp -1.0 must be finite and >= 0"),
        (["--temp", "nan"], "--temp nan must be finite and >= 0"),
        (["--top-p", "2"], "--top-p 2.0 must be finite and in 0..1"),
        (["--min-p", "5"], "--min-p 5.0 must be finite and in 0..1"),
        (["--memory-budget", "inf"], "--memory-budget inf must be a finite number of GB >= 0"),
        (["--prompt", ""], "--prompt is empty"),
        (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),  # argv bytes b"caf\xe9"
        (["--system-prompt", "\udcff"], "--system-prompt is not valid UTF-8"),
    ],
)
def test_run_refuses_bad_values_in_one_line(layout, capsys, argv, message):
    _, out = layout("qwen3_5_moe")
    assert cli.main([str(out), "--max-tokens", "2", *argv]) == 2
    assert capsys.readouterr().err == f"flashmoe-run: error: {message}\n"


def test_run_non_utf8_argv_prompt(layout):
    _, out = layout("qwen3_5_moe")
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.cli", str(out), "--prompt", b"\xff\xfe"],
        capture_output=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr == b"flashmoe-run: error: --prompt is not valid UTF-8\n"


def _answer(child) -> str:
    child.expect(b"\r\n> ")
    return child.before.decode("utf-8", "replace")


def test_chat_survives_a_read_error(layout, tmp_path):
    _, out = layout("qwen3_5_moe")
    copy = tmp_path / "layout"
    shutil.copytree(out, copy)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "flashmoe.runtime.chat", str(copy), "--bank-experts", "4", "--max-tokens", "8"],
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1"),
    )
    files = sorted((copy / "experts").glob("layer-*.bin"))
    saved = {f: f.read_bytes() for f in files}
    try:
        child.expect(b"> ")
        child.sendline(b"Hello world")
        assert _answer(child).strip()
        for f in files:
            os.truncate(f, 0)
        child.sendline(b"Tell me something else entirely")
        text = _answer(child)
        assert "flashmoe-chat: error: " in text and "the conversation is kept" in text, text
        assert "Traceback" not in text
        for f, data in saved.items():
            with open(f, "r+b") as fh:
                fh.write(data)
        child.sendline(b"/stats")
        assert "session:" in _answer(child)
        child.sendline(b"What is the capital of France?")
        assert _answer(child).strip()
        child.sendline(b"/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_refuses_a_line_that_is_not_utf8(layout):
    """Piped input (a terminal's readline drops such bytes itself)."""
    _, out = layout("qwen3_5_moe")
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.chat", str(out), "--bank-experts", "4",
         "--max-tokens", "4"],
        input=b"caf\xe9 au lait\nHello world\n/stats\n/quit\n",
        capture_output=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1"),
        timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert b"(that line is not valid UTF-8; type it again)" in r.stdout
    assert b"last answer: " in r.stdout  # the next line was answered


@pytest.mark.parametrize(
    "stdin, message",
    [
        (b"caf\xe9", "stdin: the prompt is not valid UTF-8 (byte 3)"),
        (b"", "stdin: the prompt is empty"),
        (b" \n", "stdin: the prompt is empty"),
    ],
)
def test_run_bad_stdin_prompt(layout, stdin, message):
    _, out = layout("qwen3_5_moe")
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.cli", str(out), "--prompt", "-"],
        input=stdin,
        capture_output=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.decode().splitlines()[-1] == f"flashmoe-run: error: {message}"
    assert b"Traceback" not in r.stderr


def test_run_with_stdin_closed(layout):
    """A closed fd 0 must not be taken by a layout file (MLX treats fd 0 as a failed open)."""
    _, out = layout("qwen3_5_moe")
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.cli", str(out), "--prompt", "hi", "-m", "2"],
        capture_output=True,
        preexec_fn=lambda: os.close(0),
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def test_prompt_longer_than_the_context(layout):
    _, out = layout("qwen3_5_moe")  # max_position_embeddings 4096
    env = dict(os.environ, PYTHONWARNINGS="ignore", NO_COLOR="1")
    long = "a b " * 4000
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.cli", str(out), "--prompt", long, "-m", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    last = r.stderr.splitlines()[-1]
    assert last.startswith("flashmoe-run: error: the prompt has ") and "context is 4096" in last
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.chat", str(out), "-m", "2"],
        input=f"{long}\nHello world\n/stats\n/quit\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "flashmoe-chat: error: the conversation has " in r.stdout
    assert "last answer: " in r.stdout
