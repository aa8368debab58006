"""flashmoe-serve under hostile requests and faults: every bad value gets a one-line 400, a failed
generation fails alone and the next request is answered correctly (a real server process)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from test_serve import Server, chat

VOCAB = 512  # the tiny qwen3_5_moe checkpoint's vocab_size
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def served(layout, tmp_path_factory):
    _, out = layout("qwen3_5_moe")
    copy = tmp_path_factory.mktemp("faults") / "layout"
    shutil.copytree(out, copy)  # its layer files are damaged and restored below
    server = Server(
        [sys.executable, "-m", "flashmoe.runtime.serve", str(copy), "--bank-experts", "4",
         "--max-tokens-limit", "256", "--max-tokens", "32", "--io-threads", "2"],
        copy.parent / "serve.log",
    )  # fmt: skip
    yield server, copy
    server.stop()


def _error(server: Server, path: str, raw: bytes) -> tuple[int, str]:
    status, data = server.post_raw(path, raw)
    return status, json.loads(data).get("error", "") if status != 200 else ""


BAD_CHAT = [
    ('"logit_bias": {"99999999": 5.0}', "logit_bias token id 99999999 is not in 0..511"),
    ('"logit_bias": {"-1000000": 5.0}', "logit_bias token id -1000000"),
    ('"logit_bias": {"512": 1}', "not in 0..511"),
    ('"logit_bias": {"1": NaN}', "logit_bias[1] must be finite"),
    ('"logit_bias": {"1": [1]}', "logit_bias[1] must be a number"),
    ('"logit_bias": {"x": 1}', "logit_bias key 'x' is not a token id"),
    ('"top_k": 513', "top_k must be in 0..512"),
    ('"top_k": true', "top_k must be"),
    ('"temperature": NaN', "temperature must be finite"),
    ('"temperature": Infinity', "temperature must be finite"),
    ('"temperature": -1', "temperature must be"),
    ('"temperature": true', "temperature must be a number"),
    ('"top_p": 2', "top_p must be"),
    ('"top_p": NaN', "top_p must be finite"),
    ('"min_p": 5', "min_p must be"),
    ('"presence_penalty": NaN', "presence_penalty must be finite"),
    ('"frequency_penalty": -Infinity', "frequency_penalty must be finite"),
    ('"repetition_penalty": Infinity', "repetition_penalty must be finite"),
    ('"max_tokens": true', "max_tokens must be an integer"),
    ('"seed": -1', "seed must be in 0..18446744073709551615"),
    ('"seed": 100000000000000000000000', "seed must be in"),
    ('"stop": 5', "stop must be a string or a list of strings"),
    ('"messages": [{"role": "wizard", "content": "hi"}]', "messages[0].role must be one of"),
    ('"messages": [{"role": "user", "content": 5}]', "messages[0].content must be a string"),
    ('"messages": [{"role": "user", "content": {"a": 1}}]', "messages[0].content must be"),
    ('"messages": [{"role": "user", "content": [{"type": "image_url"}]}]', "content must be"),
    ('"messages": [{"role": "user"}]', "messages[0].content must be a string"),
    ('"messages": ["hi"]', "messages[0] must be an object"),
    ('"messages": []', "messages must be a non-empty list"),
]


def test_bad_values_get_one_line_400(served):
    server, _ = served
    for field, needle in BAD_CHAT:
        raw = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + field + "}"
        status, error = _error(server, CHAT, raw.encode())
        assert status == 400 and needle in error and "\n" not in error, (field, status, error)
    for prompt in ("5", '""', '["a"]'):
        raw = f'{{"prompt": {prompt}, "max_tokens": 2}}'.encode()
        status, error = _error(server, "/v1/completions", raw)
        assert (status, error) == (400, "prompt must be a non-empty string"), prompt
    # Good values at the edges are served.
    body = chat("hi", 2, top_k=VOCAB, logit_bias={"0": 1, str(VOCAB - 1): -1.5}, seed=0)
    assert server.post(CHAT, body)[0] == 200
    parts = [{"type": "text", "text": "hi"}]
    assert server.post(CHAT, {"messages": [{"role": "user", "content": parts}]})[0] == 200
    assert server.get("/health") == (200, {"status": "ok"})


def _raw_request(port: int, headers: str, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        reply = b""  # no body sent: the answer must not wait for one, and then close
        while chunk := s.recv(65536):
            reply += chunk
        return reply


def test_bad_content_length_is_refused_without_reading_the_body(served):
    server, _ = served
    for headers in (
        "Content-Length: -1\r\n",
        "Content-Length: abc\r\n",
        "Content-Length: 1e3\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
    ):
        reply = _raw_request(server.port, headers)
        assert reply.startswith(b"HTTP/1.0 400"), (headers, reply[:200])
        assert b"Content-Length must be one non-negative integer" in reply
    assert server.post(CHAT, chat("hi", 2))[0] == 200


def test_expert_read_error_fails_alone_and_the_server_recovers(served):
    server, layout_dir = served
    prompts = [f"Tell me about the number {i}" for i in range(6)]
    before = [server.post(CHAT, chat(p, 12)) for p in prompts]
    assert all(status == 200 for status, _ in before)
    files = sorted((layout_dir / "experts").glob("layer-*.bin"))
    saved = {f: f.read_bytes() for f in files}
    try:
        for f in files:
            os.truncate(f, 0)  # every miss now hits end of file
        status, r = server.post(CHAT, chat("Something else entirely, please", 12))
        assert status == 500 and r["error"].startswith("generation failed: "), (status, r)
        assert "\n" not in r["error"]
        status, data = server.post_raw(
            CHAT, json.dumps(chat("Another one", 12, stream=True)).encode()
        )
        assert b'"error": "generation failed: ' in data
    finally:
        for f, data in saved.items():
            with open(f, "r+b") as fh:  # the same inode: the server keeps its descriptors
                fh.write(data)
    assert server.get("/health") == (200, {"status": "ok"})
    after = [server.post(CHAT, chat(p, 12)) for p in prompts]
    strip = [[r["choices"][0]["message"]["content"] for _, r in x] for x in (before, after)]
    assert strip[0] == strip[1]  # nothing stale left in the bank


def test_unresolvable_host_exits_promptly(layout):
    _, out = layout("qwen3_5_moe")
    start = time.monotonic()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashmoe.runtime.serve",
            str(out),
            "--host",
            "no.such.host.invalid",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("flashmoe-serve: error: --host no.such.host.invalid: ")
    assert time.monotonic() - start < 60


FUZZ_KEYS = ["temperature", "top_p", "top_k", "min_p", "max_tokens", "logit_bias", "seed", "stop",
             "messages", "stream", "presence_penalty", "frequency_penalty", "repetition_penalty",
             "repetition_context_size", "logprobs", "top_logprobs", "model", "tools",
             "role_mapping", "chat_template_kwargs", "stream_options", "xtc_probability",
             "max_completion_tokens", "num_draft_tokens", "adapters", "n"]  # fmt: skip
FUZZ_VALUES = ["NaN", "Infinity", "-Infinity", "-1", "0", "1", "2", "0.5", "1e308", "-1e308",
               "99999999999999999999999", "true", "false", "null", '""', '"x"', "[]", "{}",
               '["a", 1]', '{"1": 1}', '{"99999999": 5}', '[{"role": "user", "content": 1}]',
               '[{"role": "user", "content": "hi"}]', '{"include_usage": "x"}']  # fmt: skip


def test_fuzz_requests(served):
    """Mutated chat requests (fixed seed): a 200 or a 4xx with a one-line error, never a 5xx,
    a dropped connection or a changed answer afterwards."""
    import random

    server, _ = served

    def content() -> str:
        status, r = server.post(CHAT, chat("Hello world", 8))
        assert status == 200, r
        return r["choices"][0]["message"]["content"]

    reference = content()
    rng = random.Random(15)
    statuses: dict[int, int] = {}
    for case in range(200):
        fields = {"messages": '[{"role": "user", "content": "hi"}]', "max_tokens": "2"}
        for _ in range(rng.choice([1, 2, 3])):
            fields[rng.choice(FUZZ_KEYS)] = rng.choice(FUZZ_VALUES)
        raw = ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()
        if case % 20 == 0:
            raw = raw.replace(b'"hi"', b'"h\xff"')  # not UTF-8
        if case % 20 == 10:
            raw = raw[:-1] + b', "max_tokens": 3}'  # a duplicate key (the last one wins)
        status, data = server.post_raw(CHAT, raw)
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 400, 404), (case, raw, status, data[:300])
        if status != 200:
            error = json.loads(data)["error"]
            assert error and "\n" not in error, (case, raw, error)
    print(f"request fuzz: {statuses}")
    assert statuses.get(400, 0) > 40 and statuses.get(200, 0) > 5, statuses
    assert server.get("/health") == (200, {"status": "ok"})
    assert content() == reference
