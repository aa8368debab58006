"""flashmoe-serve against stock mlx_lm.server: real processes on loopback, plain HTTP clients."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

LIMIT = 1024  # --max-tokens-limit of the flashmoe server under test
PROMPTS = ["Hello world", "What is the capital of France?"]
# Only ever sent concurrently to flashmoe-serve (so its prompt cache cannot help): different
# lengths, so the batch is right-padded and rows finish at different steps.
CONCURRENT = [
    ("The quick brown fox jumps over the lazy dog. " * 3, 20),
    ("def main():", 12),
    ("Streaming experts from a solid state disk lets a laptop run a big model.", 16),
    ("0123456789", 24),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], log_path):
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "w")
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [*cmd, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {open(log_path).read()[-2000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not come up")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def conn(self, timeout=120):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path):
        c = self.conn(timeout=5)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, json.loads(r.read() or b"null")
        finally:
            c.close()

    def post_raw(self, path, body: bytes):
        c = self.conn()
        try:
            c.request("POST", path, body, {"Content-Type": "application/json"})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def post(self, path, body: dict):
        status, data = self.post_raw(path, json.dumps(body).encode())
        return status, json.loads(data)

    def stream(self, path, body: dict) -> list[dict]:
        status, data = self.post_raw(path, json.dumps(dict(body, stream=True)).encode())
        assert status == 200, data
        events = []
        for line in data.decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
        assert data.decode().rstrip().endswith("data: [DONE]")
        return events

    def stats(self) -> dict:
        return self.get("/flashmoe/stats")[1]


@pytest.fixture(scope="module")
def servers(layout, tmp_path_factory):
    src, out = layout("qwen3_5_moe")
    logs = tmp_path_factory.mktemp("serve")
    py = sys.executable
    ours = Server(
        [py, "-m", "flashmoe.runtime.serve", str(out), "--bank-experts", "6",
         "--max-tokens-limit", str(LIMIT), "--max-prompt-tokens", "200",
         "--max-request-bytes", "65536", "--io-threads", "2"],
        logs / "flashmoe.log",
    )  # fmt: skip
    try:
        stock = Server([py, "-m", "mlx_lm", "server", "--model", str(src)], logs / "stock.log")
    except BaseException:
        ours.stop()
        raise
    yield ours, stock, out
    ours.stop()
    stock.stop()


def chat(prompt: str, n: int = 16, **extra) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, **extra}


def answer(server: Server, body: dict) -> tuple[str, str]:
    status, r = server.post("/v1/chat/completions", body)
    assert status == 200, r
    return r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]


def test_concurrent_clients_match_alone(servers):
    ours, stock, _ = servers
    alone = [answer(stock, chat(p, n)) for p, n in CONCURRENT]
    results: list = [None] * len(CONCURRENT)
    before = ours.stats()

    def client(i):
        p, n = CONCURRENT[i]
        results[i] = answer(ours, chat(p, n))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(CONCURRENT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == alone
    after = ours.stats()
    assert after["misses"] > before["misses"]  # the bank (6 of 16) had to stream
    # And each request alone on flashmoe-serve, too.
    assert [answer(ours, chat(p, n)) for p, n in CONCURRENT] == alone


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_greedy_identical_to_mlx_lm_server(servers, prompt):
    ours, stock, _ = servers
    status, mine = ours.post("/v1/chat/completions", chat(prompt, 24))
    _, ref = stock.post("/v1/chat/completions", chat(prompt, 24))
    assert status == 200
    assert mine["choices"] == ref["choices"]
    assert mine["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"] == 24
    assert mine["object"] == "chat.completion"


def _joined(events, key):
    return "".join(e["choices"][0].get(key) or "" for e in events if e["choices"])


def test_chat_streaming_identical(servers):
    ours, stock, _ = servers
    body = chat(PROMPTS[0], 20, stream_options={"include_usage": True})
    mine, ref = (
        ours.stream("/v1/chat/completions", body),
        stock.stream("/v1/chat/completions", body),
    )
    text = "".join((e["choices"][0]["delta"].get("content") or "") for e in mine if e["choices"])
    assert text == "".join(
        (e["choices"][0]["delta"].get("content") or "") for e in ref if e["choices"]
    )
    assert text == answer(ours, chat(PROMPTS[0], 20))[0]
    assert mine[-1]["usage"]["completion_tokens"] == 20
    assert [e["choices"][0]["finish_reason"] for e in mine if e["choices"]][-1] == "length"


def test_text_completions_identical(servers):
    ours, stock, _ = servers
    body = {"prompt": "The capital of France is", "max_tokens": 16}
    status, mine = ours.post("/v1/completions", body)
    _, ref = stock.post("/v1/completions", body)
    assert status == 200 and mine["object"] == "text_completion"
    assert mine["choices"] == ref["choices"]
    streamed = ours.stream("/v1/completions", body)
    assert (
        _joined(streamed, "text")
        == mine["choices"][0]["text"]
        == _joined(stock.stream("/v1/completions", body), "text")
    )


def test_models_and_model_names(servers):
    ours, _, out = servers
    status, models = ours.get("/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [str(out)]
    assert ours.get(f"/v1/models/{out.name}")[0] == 200
    assert ours.get("/v1/models/other")[0] == 404
    for name in (str(out), out.name):
        status, r = ours.post("/v1/chat/completions", chat(PROMPTS[1], 4, model=name))
        assert status == 200 and r["model"] == name


def test_bad_requests_get_4xx(servers):
    ours, _, _ = servers
    path = "/v1/chat/completions"
    assert ours.post_raw(path, b"{not json")[0] == 400
    assert ours.post_raw(path, b"[1, 2]")[0] == 400
    assert ours.post(path, {"prompt": "no messages"})[0] == 400
    assert ours.post(path, {"messages": "not a list"})[0] == 400
    status, r = ours.post(path, chat("hi", model="some/other-model"))
    assert status == 404 and "not found" in r["error"]
    status, r = ours.post(path, chat("hi", n=LIMIT + 1))
    assert status == 400 and str(LIMIT) in r["error"]
    assert ours.post(path, chat("hi", n=0))[0] == 400
    assert ours.post(path, chat("hi", temperature=-1))[0] == 400
    status, r = ours.post(path, chat("hello " * 300))  # > --max-prompt-tokens 200
    assert status == 400 and "at most 200" in r["error"]
    status, _ = ours.post_raw(path, json.dumps(chat("x" * 70000)).encode())
    assert status == 413
    assert ours.post_raw("/v1/other", b"{}")[0] == 404
    assert ours.get("/health") == (200, {"status": "ok"})


def _settled_calls(server: Server) -> int:
    """The store's call counter once generation has stopped moving it."""
    last = server.stats()["calls"]
    for _ in range(100):
        time.sleep(0.3)
        now = server.stats()["calls"]
        if now == last:
            return now
        last = now
    raise AssertionError("generation never stopped")


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_stops_generation_and_server_keeps_serving(servers, stream):
    ours, _, _ = servers
    layers = ours.stats()["moe_layers"]
    start = _settled_calls(ours)
    body = json.dumps(chat("Tell me a long story", LIMIT, stream=stream)).encode()
    s = socket.create_connection(("127.0.0.1", ours.port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.0 200")  # headers, then tokens flow
    else:
        time.sleep(0.5)
    s.close()
    # Greedy, this prompt runs 432 tokens before its end token; stopped at the disconnect, far
    # fewer decode steps ran (one store call per MoE layer and step).
    assert _settled_calls(ours) - start < layers * 200
    assert ours.get("/health") == (200, {"status": "ok"})
    assert answer(ours, chat(PROMPTS[0], 24)) == answer(servers[1], chat(PROMPTS[0], 24))


# ---- command line ------------------------------------------------------------------------


def run_serve(*args):
    return subprocess.run(
        [sys.executable, "-m", "flashmoe.runtime.serve", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONWARNINGS="ignore"),
        timeout=120,
    )


def test_cli_errors_are_one_line(layout, tmp_path):
    _, out = layout("qwen3_5_moe")
    for args, needle in [
        ((tmp_path / "missing",), "missing"),
        ((out, "--k", "99"), "--k 99"),
        ((out, "--port", "70000"), "--port 70000"),
        ((out, "--max-tokens", "600", "--max-tokens-limit", "500"), "--max-tokens-limit"),
    ]:
        r = run_serve(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0
        assert len(lines) == 1 and lines[0].startswith("flashmoe-serve: error:"), r.stderr
        assert needle in lines[0]


def test_bank_budget_counts_every_concurrent_sequence(monkeypatch, capsys):
    from flashmoe.runtime import loader, serve

    seen = {}

    def fake_load(model, **kw):
        seen.update(kw)
        return None, None

    def fake_server(*a):
        raise ValueError("stop here")

    monkeypatch.setattr(loader, "load", fake_load)
    monkeypatch.setattr(serve, "make_server", fake_server)
    argv = ["m", "--memory-budget", "8", "--max-prompt-tokens", "1000", "--max-tokens-limit", "24"]
    assert serve.main([*argv, "--max-tokens", "16", "--decode-concurrency", "3"]) == 2
    assert seen["max_kv_tokens"] == 3 * 1024 and seen["memory_budget_gb"] == 8
    note, error = capsys.readouterr().err.splitlines()
    assert note.startswith("flashmoe-serve: bank sized for a KV cache of 3,072 tokens (3 ")
    assert error == "flashmoe-serve: error: stop here"
    assert serve.main([*argv, "--max-tokens", "16"]) == 2  # default --decode-concurrency 32
    assert seen["max_kv_tokens"] == 32 * 1024


def test_cli_warns_when_not_on_loopback(layout):
    _, out = layout("qwen3_5_moe")
    r = run_serve(out, "--host", "0.0.0.0", "--k", "99")  # fails after the warning, binds nothing
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("flashmoe-serve: warning: binding to 0.0.0.0")
    assert lines[-1].startswith("flashmoe-serve: error:")


# ---- the batched path in-process (what the server runs), deterministic batching -----------


def _batch_tokens(model, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)
    uids = gen.insert(prompts, max_tokens=max_tokens)
    out: dict[int, list[int]] = {u: [] for u in uids}
    try:
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(r.token)
    finally:
        gen.close()
    return [out[u] for u in uids]


def test_batch_generator_rows_match_stock_and_alone(layout):
    import mlx_lm
    from flashmoe.runtime import load

    src, out = layout("qwen3_5_moe")
    model, tok = load(str(out), bank_experts=5)  # 4 rows x top-4 never fit: token groups
    ref_model, _ = mlx_lm.load(str(src))
    prompts = [tok.encode(p) for p, _ in CONCURRENT]
    lengths = [n for _, n in CONCURRENT]
    batched = _batch_tokens(model, prompts, lengths)
    assert batched == _batch_tokens(ref_model, prompts, lengths)
    assert [len(t) for t in batched] == lengths
    for p, n, tokens in zip(prompts, lengths, batched, strict=True):
        assert _batch_tokens(model, [p], [n]) == [tokens]
