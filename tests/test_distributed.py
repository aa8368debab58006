"""Pipeline-parallel generation over mx.distributed: real ranks on 127.0.0.1, MLX's ring backend.

Each rank is a process started the way ``mlx.launch`` starts it (``MLX_RANK`` and a ring
hostfile in ``MLX_HOSTFILE``); one test goes through ``mlx.launch`` itself. Every process has a
timeout, and is killed by the test if it outlives it.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from flashmoe.bench.cli import main as bench_main
from flashmoe.convert.hub import publish
from flashmoe.layouts import LayoutError, read_index
from flashmoe.runtime import load
from flashmoe.runtime.cli import main as run_main
from flashmoe.runtime.hub import is_verified, verify_once
from flashmoe.runtime.pipeline import balanced_ranges, plan_stages
from flashmoe.runtime.trace import read_trace
from mlx_lm.utils import load_tokenizer

RANK_SCRIPT = Path(__file__).with_name("distributed_rank.py")
PROMPT_TEXT = "Streaming experts from a solid state disk. What is the capital of France? Paris."
TIMEOUT_S = 120
TOKENS = 16


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _hostfile(tmp_path: Path, ranks: int) -> Path:
    path = tmp_path / f"hosts-{ranks}.json"
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(ranks)]))
    return path


def _start(argvs: list[list[str]], hostfile: Path, *, stdin0=None, **env) -> list[subprocess.Popen]:
    """One process per rank (``argvs[r]`` for rank r), as mlx.launch starts them; ``stdin0``:
    rank 0's standard input."""
    from test_cli import default_sigint

    procs = []
    for rank, argv in enumerate(argvs):
        e = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), **env}
        procs.append(
            subprocess.Popen(
                argv,
                env=e,
                stdin=stdin0 if rank == 0 else None,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=default_sigint,  # a Ctrl-C reaches them
            )
        )
    return procs


def _kill_left(procs: list[subprocess.Popen]) -> None:
    """Kill and reap every process still running (a test's cleanup, whatever it raised)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _finish(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[tuple]:
    """(returncode, stdout, stderr) of each; any process still running at the deadline is
    killed and fails the test."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out.decode(), err.decode()))
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.kill()
            p.wait()
    assert not hung, "a rank was still running at the deadline"
    return results


def _run(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "flashmoe.runtime.cli", *argv]


def _prompt(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT_TEXT}], add_generation_prompt=True
    )


def test_stages_balanced_by_bytes(layout):
    _, out = layout("qwen3_5_moe")
    index = read_index(out)
    plan = plan_stages(out, index, 2)
    # rank 0 runs the last layers (mlx-lm's pipeline order), each rank half of the 4 layers
    assert [(s.start, s.stop, s.moe_layers) for s in plan.stages] == [
        (2, 4, (2, 3)),
        (0, 2, (0, 1)),
    ]
    assert plan.split == [2, 2]
    assert balanced_ranges([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert balanced_ranges([1, 1, 1, 1], 3) == [(0, 1), (1, 2), (2, 4)]
    with pytest.raises(ValueError, match="5 ranks for 4 MoE layers"):
        plan_stages(out, index, 5)


def test_two_ranks_bit_identical_to_one_process_and_mlx_lm(layout, hub, tmp_path):
    """The ranks run the layout published on the Hub (emulator): each pulls only its part."""
    src, out = layout("qwen3_5_moe")
    local = tmp_path / "published"
    shutil.copytree(out, local)  # publish writes the model card into it
    publish(local, "org/tiny", progress=False, out=open(os.devnull, "w"))
    index = read_index(out)
    top_k, experts = index.top_k, index.num_experts
    # min, 25 % (the same 4 of this model's 16), 50 %, 100 %: one launch checks them all
    banks = sorted({top_k, max(top_k, experts // 4), experts // 2, experts})
    prompt = _prompt(load_tokenizer(src))
    base = tmp_path / "out"
    homes = [tmp_path / f"home{r}" for r in range(2)]  # each rank its own machine's cache
    argvs = [
        ["env", f"HF_HOME={h}", f"HF_HUB_CACHE={h / 'hub'}", sys.executable, str(RANK_SCRIPT)]
        + ["org/tiny", str(base), json.dumps(prompt), str(TOKENS), *map(str, banks)]
        for h in homes
    ]
    procs = _start(argvs, _hostfile(tmp_path, 2))
    try:  # while the ranks run: stock mlx-lm
        ref_model, tokenizer = mlx_lm.load(str(src))
        ref_logits = np.array(ref_model(mx.array(prompt)[None]).astype(mx.float32))
        ref_tokens = [r.token for r in mlx_lm.stream_generate(ref_model, tokenizer, prompt, TOKENS)]
    finally:
        results = _finish(procs)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(err for _, _, err in results)

    # one process, the smallest bank: the same numbers, and the same expert reads in all
    model, tok = load(str(out), bank_experts=banks[0])
    single_logits = np.array(model(mx.array(prompt)[None]).astype(mx.float32))
    single_tokens = [r.token for r in mlx_lm.stream_generate(model, tok, prompt, TOKENS)]
    single_misses = model.flashmoe.store.stats.misses
    model.flashmoe.close()

    ranks = [np.load(f"{base}.rank{r}.npz") for r in range(2)]
    figures = [json.loads(Path(f"{base}.rank{r}.json").read_text()) for r in range(2)]
    for bank in banks:
        for r in range(2):  # every rank computes the same logits (mlx-lm's all-gather)
            assert np.array_equal(ranks[r][f"logits{bank}"], ref_logits), (bank, r)
            assert ranks[r][f"tokens{bank}"].tolist() == ref_tokens, (bank, r)
        # each rank holds the banks and files of its own MoE layers only
        assert figures[0][str(bank)]["banks"] == [2, 3]
        assert figures[1][str(bank)]["banks"] == [0, 1]
        assert figures[0][str(bank)]["layer_files"] == figures[1][str(bank)]["layer_files"] == 2
    assert np.array_equal(single_logits, ref_logits) and single_tokens == ref_tokens
    assert sum(f[str(banks[0])]["misses"] for f in figures) == single_misses
    _assert_pulled_parts(hub, index, homes)


def _assert_pulled_parts(hub, index, homes: list[Path]) -> None:
    """Each rank's cache holds its own layer files only (and each was served once, to it), its
    part passed the checksum verification; the dense file is one file, which every rank needs."""
    for home, own in zip(homes, ([2, 3], [0, 1]), strict=True):
        (snapshot,) = (home / "hub" / "models--org--tiny" / "snapshots").iterdir()
        layer_files = sorted(p.name for p in (snapshot / "experts").iterdir())
        assert layer_files == [f"layer-{n:03d}.bin" for n in own], home
        assert is_verified(snapshot, own) and not is_verified(snapshot)
    for entry in index.layers:
        assert hub.bytes_served[entry.file] == entry.size, entry.file
    assert hub.bytes_served[index.dense.name] == 2 * index.dense.size
    # a damaged byte of a rank's part is found again
    blob = os.path.realpath(snapshot / index.layer(0).file)
    with open(blob, "r+b") as f:
        f.write(bytes([f.read(1)[0] ^ 1]))
    assert not is_verified(snapshot, [0, 1])
    with pytest.raises(LayoutError, match="layer 0 expert 0: sha256 mismatch"):
        verify_once(snapshot, layers=[0, 1])


def test_flashmoe_run_under_mlx_launch_three_ranks(layout, tmp_path):
    src, out = layout("qwen3_5_moe")
    ref_model, tokenizer = mlx_lm.load(str(src))
    text = "".join(
        r.text for r in mlx_lm.stream_generate(ref_model, tokenizer, _prompt(tokenizer), 8)
    )
    port = _free_ports(1)[0]
    launch = (
        "import sys; from importlib.metadata import entry_points; "
        "(ep,) = entry_points(group='console_scripts', name='mlx.launch'); "
        "sys.argv[0] = 'mlx.launch'; ep.load()()"
    )
    argv = [sys.executable, "-c", launch, "--hosts", ",".join(["127.0.0.1"] * 3)]
    argv += ["--starting-port", str(port), "--"]  # "--": mlx.launch has a -p of its own
    options = ["-p", PROMPT_TEXT, "-m", "8", "--bank-experts", "4", "--timing", "--trace"]
    argv += _run([str(out), *options, str(tmp_path / "ranks.fmt")])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.stdout == text + "\n", r.stderr  # rank 0 alone prints: stock mlx-lm's text
    for rank, layers in enumerate(("2-3", "1-1", "0-0")):  # the middle rank receives and sends
        assert f"[timing] rank {rank}: layers {layers}, bank 4 experts/layer" in r.stderr, r.stderr
    assert "[timing] transfers:" in r.stderr
    # --trace: every rank's layers in rank 0's file, the trace one process writes
    assert run_main([str(out), *options, str(tmp_path / "one.fmt")]) == 0
    _assert_same_trace(tmp_path / "ranks.fmt", tmp_path / "one.fmt")
    assert bench_main(["policy", str(tmp_path / "ranks.fmt"), "--slots", "4"]) == 0


def _assert_same_trace(ranks: Path, one: Path) -> None:
    merged, single = read_trace(ranks), read_trace(one)
    assert sorted(merged.layers) == sorted(single.layers) == [0, 1, 2, 3]
    assert merged.meta["ranks"] > 1 and "ranks" not in single.meta
    for layer, t in single.layers.items():
        m = merged.layers[layer]
        assert t.step.size > 0, layer
        assert np.array_equal(m.experts, t.experts), layer
        assert np.array_equal(m.hit, t.hit), layer
        assert np.array_equal(m.step, t.step), layer


def test_a_different_layout_stops_every_rank(layout, tmp_path):
    _, out = layout("qwen3_5_moe")
    other = tmp_path / "other"
    shutil.copytree(out, other)
    index = json.loads((out / "flashmoe-index.json").read_text())
    index["created_by"] = "another converter"
    (other / "flashmoe-index.json").write_text(json.dumps(index))
    procs = _start([_run([str(out)]), _run([str(other)])], _hostfile(tmp_path, 2))
    (code0, out0, err0), (code1, out1, err1) = _finish(procs)
    assert code0 == code1 == 2
    assert err0.splitlines() == [
        f"flashmoe-run: error: rank 1 has a different layout than rank 0 "
        f"(flashmoe-index.json sha256 {err0.split('sha256 ')[1].split(')')[0]})"
    ]
    assert out0 == out1 == err1 == ""


def test_a_rank_that_dies_stops_the_others(layout, tmp_path):
    _, out = layout("qwen3_5_moe")
    argv = _run([str(out), "-m", "4000", "--ignore-chat-template", "-p", "Hello"])
    procs = _start([argv, argv], _hostfile(tmp_path, 2))
    try:
        ready, _, _ = select.select([procs[0].stdout], [], [], TIMEOUT_S)
        assert ready, "rank 0 printed nothing"
        procs[1].send_signal(signal.SIGKILL)  # mid-generation
        (code0, _, err0), (code1, _, _) = _finish(procs, timeout=60)
    finally:
        _kill_left(procs)
    assert code1 == -signal.SIGKILL
    assert code0 == 2
    lines = [line for line in err0.splitlines() if not line.startswith("flashmoe: pipeline")]
    assert lines == [
        "flashmoe-run: error: lost the connection to another rank (it exited, or its host is "
        "unreachable)"
    ]


def test_a_rank_that_never_starts_times_out(layout, tmp_path):
    _, out = layout("qwen3_5_moe")
    hostfile = _hostfile(tmp_path, 2)
    procs = _start([_run([str(out)])], hostfile, FLASHMOE_RANK_TIMEOUT="2")
    ((code, stdout, err),) = _finish(procs, timeout=60)
    assert code != 0
    assert err.splitlines() == [
        "flashmoe-run: error: no answer from the other ranks for 2 s while connecting to the "
        "other ranks (one died, never started or cannot be reached; FLASHMOE_RANK_TIMEOUT sets "
        "the limit)"
    ]


def _post(port: int, path: str, body: dict) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        data = json.loads(r.read())
        assert r.status == 200, data
        return data
    finally:
        c.close()


def _serve_alone(out: Path, argv: list[str], body: dict) -> dict:
    """One request to single-process flashmoe-serve, in this process."""
    from flashmoe.runtime.serve import build_parser, make_server

    args = build_parser().parse_args([str(out), "--port", "0", *argv])
    model, tokenizer = load(str(out), bank_experts=args.bank_experts, trace=args.trace)
    httpd, generator = make_server(args, model, tokenizer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        return _post(httpd.server_address[1], "/v1/chat/completions", body)
    finally:
        httpd.shutdown()
        httpd.server_close()
        generator.stop_and_join()
        model.flashmoe.close()


def _wait_for_port(port: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert all(p.poll() is None for p in procs), "a rank exited"
        assert time.monotonic() < deadline, "flashmoe-serve did not come up"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)


def test_flashmoe_serve_across_two_ranks(layout, tmp_path):
    src, out = layout("qwen3_5_moe")
    port = _free_ports(1)[0]
    options = ["--bank-experts", "6", "--log-level", "WARNING", "--trace"]
    argv = [sys.executable, "-m", "flashmoe.runtime.serve", str(out), "--port", str(port)]
    procs = _start([argv + options + [str(tmp_path / "ranks.fmt")]] * 2, _hostfile(tmp_path, 2))
    try:
        # while the ranks start: stock mlx-lm's greedy tokens, flashmoe-serve's answer alone
        ref_model, tokenizer = mlx_lm.load(str(src))
        ref = mlx_lm.stream_generate(ref_model, tokenizer, _prompt(tokenizer), TOKENS)
        body = {
            "messages": [{"role": "user", "content": PROMPT_TEXT}],
            "max_tokens": TOKENS,
            "temperature": 0,
            "logprobs": True,
        }
        alone = _serve_alone(out, options + [str(tmp_path / "one.fmt")], body)
        _wait_for_port(port, procs)
        answer = _post(port, "/v1/chat/completions", body)
        tokens = [t["id"] for t in answer["choices"][0]["logprobs"]["content"]]
        assert tokens == [r.token for r in ref]
        assert answer["choices"] == alone["choices"]  # the text, and bit-identical logprobs
        for p in procs:  # Ctrl-C in the terminal of mlx.launch: every rank gets it
            p.send_signal(signal.SIGINT)
        results = _finish(procs, timeout=60)
    finally:
        _kill_left(procs)
    assert [code for code, _, _ in results] == [130, 130], results
    assert results[0][2].endswith("flashmoe-serve: interrupted\n"), results[0][2]
    assert results[1][2] == "", results[1][2]
    _assert_same_trace(tmp_path / "ranks.fmt", tmp_path / "one.fmt")


def test_flashmoe_serve_stops_when_a_rank_dies(layout, tmp_path):
    _, out = layout("qwen3_5_moe")
    port = _free_ports(1)[0]
    argv = [sys.executable, "-m", "flashmoe.runtime.serve", str(out), "--port", str(port)]
    argv += ["--bank-experts", "4", "--log-level", "WARNING"]
    procs = _start([argv, argv], _hostfile(tmp_path, 2))
    try:
        _wait_for_port(port, procs)
        procs[1].send_signal(signal.SIGKILL)  # while idle: the ranks poll for requests together
        (code0, _, err0), (code1, _, _) = _finish(procs, timeout=60)
    finally:
        _kill_left(procs)
    assert (code0, code1) == (2, -signal.SIGKILL)
    lines = [
        line
        for line in err0.splitlines()
        if not line.startswith(("flashmoe: pipeline", "flashmoe-serve: serving"))
    ]
    assert lines == [
        "flashmoe-serve: error: lost the connection to another rank (it exited, or its host is "
        "unreachable)"
    ], err0


def test_flashmoe_chat_across_two_ranks(layout, tmp_path):
    src, out = layout("qwen3_5_moe")
    argv = [sys.executable, "-m", "flashmoe.runtime.chat", str(out), "--max-tokens", "4000"]
    argv += ["--bank-experts", "6"]
    hostfile = _hostfile(tmp_path, 2)
    procs = _start([argv] * 2, hostfile, stdin0=subprocess.PIPE, NO_COLOR="1")
    chat, said = procs[0], b""
    try:
        chat.stdin.write(b"Tell me a long story\n")
        chat.stdin.flush()
        ref_model, tokenizer = mlx_lm.load(str(src))  # meanwhile: what stock mlx-lm answers
        messages = [{"role": "user", "content": "Tell me a long story"}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ref = "".join(r.text for r in mlx_lm.stream_generate(ref_model, tokenizer, prompt, 100))
        while b"> " not in said or len(said.split(b"> ", 1)[1]) < 4:  # the answer streams
            assert select.select([chat.stdout], [], [], TIMEOUT_S)[0], said
            said += os.read(chat.stdout.fileno(), 65536)
        # a terminal's Ctrl-C reaches every rank; one reaching the other rank alone is enough
        procs[1].send_signal(signal.SIGINT)
        chat.stdin.write(b"/reset\n")  # read once the answer stopped; then the end of input
        chat.stdin.close()
        chat.stdin = None
        results = _finish(procs)
    finally:
        _kill_left(procs)
    assert [code for code, _, _ in results] == [0, 0], results
    text = (said + results[0][1].encode()).decode(errors="surrogateescape")
    answer, rest = text.split("> ", 1)[1].split("\n[interrupted]\n", 1)
    assert 4 <= len(answer) < len(ref) and ref.startswith(answer)  # every rank stopped there
    assert rest == "> (new conversation)\n> \n"
    assert results[1][1] == results[1][2] == ""  # the other rank follows silently


def test_ring_messages_are_dropped_even_interleaved():
    from flashmoe.runtime.group import _unring

    # seen on stderr when a peer died: libmlx's pieces from two threads, and our line in one
    for line in [
        b"[ring] Socket [ring] Socket 4 was closed by the peer",
        b"5 was closed by the peer",
        b" Sending to socket 3 failed with errno 32",
        b"[ring] Receiving from socket 4 failed with errno 104",
    ]:
        assert _unring(line) is None
    error = b"flashmoe-serve: error: lost the connection to another rank"
    assert _unring(b"[ring] Socket " + error) == error
    assert _unring(b"[ring] Too many send/recv errors. Failing pending tasks...") is None
    assert _unring(b"[ring] anything else") is None
    assert _unring(b"  text [x]") == b"  text [x]" and _unring(b"") == b""
