"""``flashmoe-serve``: mlx-lm's OpenAI-compatible server on a model whose experts stream from disk.

Nothing of ``mlx_lm.server``'s request handling is copied; three of its classes are subclassed:

- ``ModelProvider._load`` returns the pair built by ``flashmoe.runtime.load`` (loaded once, before
  the server listens, so bad options fail on the command line) and never loads another model.
- ``ResponseGenerator`` (its batching, prompt cache, tool-call and thinking parsing) gains a prompt
  length limit and watches the client socket, stopping a generation whose client went away.
- ``APIHandler`` gains the safety checks (body size, ``max_tokens`` limit, model name, proper 4xx
  statuses), ``/v1/models`` for the served model only and ``GET /flashmoe/stats``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import select
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

from ..cli import command, error_line
from .options import add_generation_options, add_runtime_options, load_options
from .request_checks import check_logit_bias, check_request

PROG = "flashmoe-serve"
MiB = 1 << 20

# The handler thread's pending error status and client socket (the stock handler maps every
# generation-setup error to 404; ours reports the status the error deserves).
_local = threading.local()


class RequestRejected(ValueError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class GenerationFailed(RuntimeError):
    """The generation step serving a request raised (an expert read error, ...); the server
    fails the requests in flight and keeps serving."""


_CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
_STOP = "flashmoe-serve: stop"  # shared by rank 0 in place of a request: every rank stops
_STOP_WAIT_S = 10.0  # a rank other than 0, after a Ctrl-C: how long rank 0 has to stop it
_DIGITS = re.compile(r"[0-9]{1,19}")


class _Relay:
    """A request's response queue that notes an error put after its generation started."""

    def __init__(self, queue):
        self.queue, self.started, self.failure = queue, False, None

    def put(self, item) -> None:
        if isinstance(item, Exception) and self.started:
            self.failure = GenerationFailed(f"generation failed: {error_line(item)}")
            item = self.failure
        self.started = self.started or not isinstance(item, Exception)
        self.queue.put(item)


def _status_for(e: Exception) -> int:
    if isinstance(e, RequestRejected):
        return e.status
    if isinstance(e, GenerationFailed):
        return 500
    if isinstance(e, RuntimeError) and "generation thread died" in str(e):
        return 503
    return 400  # the prompt could not be built from the request (messages, template, ...)


def _peer_closed(conn: socket.socket) -> bool:
    """Whether the client closed its end (an HTTP/1.0 client sends nothing after the body)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def runtime_stats(runtime) -> dict:
    """The expert store's counters (since the server started) and the bank geometry; across
    ranks, rank 0's: its MoE layers only (``ranks``, ``layers``)."""
    s = runtime.store.stats
    moe_layers = len(runtime.index.layers)
    extra = {}
    if runtime.plan is not None:
        stage = runtime.plan.stages[runtime.rank]
        moe_layers = len(stage.moe_layers)
        extra = {"ranks": len(runtime.plan.stages), "layers": [stage.start, stage.stop - 1]}
    return {
        "hits": s.hits,
        "misses": s.misses,
        "hit_rate": s.hit_rate,
        "bytes_read": s.bytes_read,
        "io_seconds": s.io_seconds,
        "calls": s.calls,
        "prefetch": runtime.store.prefetch_mode,
        "prefetch_experts": s.prefetch_experts,
        "prefetch_used": s.prefetch_used,
        "prefetch_bytes": s.prefetch_bytes,
        "prefetch_unused_bytes": s.prefetch_unused_bytes,
        "bank_experts": runtime.slots,
        "num_experts": runtime.index.num_experts,
        "moe_layers": moe_layers,
        "expert_bytes": runtime.index.expert_bytes,
        "top_k": runtime.top_k,
        **extra,
    }


def _server_classes():
    """The subclasses of mlx_lm.server's classes (imported lazily: mlx_lm.server is heavy)."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator, _image_parts

    class FlashmoeModelProvider(ModelProvider):
        """Serves the one streamed model it was given; ``model`` names are aliases of it."""

        def __init__(self, cli_args: argparse.Namespace, model, tokenizer):
            super().__init__(cli_args)
            self._pair = (model, tokenizer)
            self.runtime = model.flashmoe
            config = self.runtime.index.config
            self.vocab_size = int(config.get("text_config", config)["vocab_size"])
            p = Path(cli_args.model).expanduser()
            self.names = {"default_model", cli_args.model, p.name}
            if p.exists():
                self.names.add(str(p.resolve()))

        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            if (model_path, adapter_path, draft_model_path) != (self.cli_args.model, None, None):
                raise RequestRejected(404, f"model {model_path!r} is not served here")
            model, tokenizer = self._pair
            self.model_key = (model_path, adapter_path, draft_model_path)
            self.model, self.tokenizer = model, tokenizer
            self.processor = None
            self.draft_model = None
            self.is_batchable = all(hasattr(c, "merge") for c in make_prompt_cache(model))

    class FlashmoeResponseGenerator(ResponseGenerator):
        """Stock generation loop, restarted when a step raises: the requests it had taken fail
        with GenerationFailed, later ones are served. Three failures in a row that took no
        request mean the loop cannot run: ``on_fatal`` is called (the server shuts down and
        exits non-zero rather than answer 503 forever).

        Across ranks (mlx-lm's distributed mode: every rank runs this loop, rank 0 shares each
        request it takes), a failure is fatal at once, since the ranks may no longer be in
        step, and rank 0's ``stop_and_join`` shares a stop with the other ranks, so that every
        loop ends at the same point."""

        def __init__(self, *args, on_fatal: Callable[[BaseException], None] | None = None):
            self._taken: weakref.WeakSet = weakref.WeakSet()  # response queues of taken requests
            self._taken_lock = threading.Lock()
            self.on_fatal = on_fatal
            self.fatal: BaseException | None = None
            self.rounds = 0  # polls of the request queue: across ranks, the watchdog's progress
            self.stop_code: int | None = None  # across ranks: rank 0's exit code, once stopped
            super().__init__(*args)

        def _next_request(self, timeout=None):
            item = super()._next_request(timeout)
            self.rounds += 1
            if item is not None and isinstance(item[1], str):  # _STOP, from rank 0
                self.stop_code = item[2]
                self._stop = True
                return None
            if item is not None:
                with self._taken_lock:
                    self._taken.add(item[0])
            return item

        def stop_and_join(self, code: int = 0):
            """Stop the loop; across ranks, rank 0 stops every rank's (``code`` is what the
            others exit with)."""
            if not self._is_distributed:
                return super().stop_and_join()
            if self._rank == 0:
                from queue import Queue

                self.requests.put((Queue(), _STOP, code))  # taken after the requests before it
            self.join()

        def _fail_taken(self, e: BaseException) -> int:
            with self._taken_lock:
                queues = list(self._taken)
                self._taken = weakref.WeakSet()
            err = GenerationFailed(f"generation failed: {error_line(e)}")
            for q in queues:
                q.put(err)  # a request already answered has stopped reading: ignored
            return len(queues)

        def _run_generate(self):
            idle_failures = 0
            while not self._stop:
                try:
                    self._generate()
                    return
                except Exception as e:
                    failed = self._fail_taken(e)
                    if self._is_distributed:  # the ranks may be out of step: stop
                        idle_failures = 3
                    else:
                        logging.error(
                            "generation failed (%s); %d request(s) failed, serving on",
                            error_line(e),
                            failed,
                        )
                        idle_failures = 0 if failed else idle_failures + 1
                    if idle_failures >= 3:
                        self.fatal = e
                        self._generation_failed = True
                        if self.on_fatal is not None:
                            self.on_fatal(e)
                        return

        def _serve_single(self, request, stream):
            """Across ranks, a request served alone (seeded) that fails once its generation
            began ends the loop (the ranks may be out of step); before, the request fails
            alone (every rank refuses it the same way)."""
            if not self._is_distributed:
                return super()._serve_single(request, stream)
            relay = _Relay(request[0])
            super()._serve_single((relay, *request[1:]), stream)
            if relay.failure is not None:
                raise relay.failure

        def _tokenize(self, tokenizer, request, args):
            out = super()._tokenize(tokenizer, request, args)
            n, limit = len(out[0]), self.cli_args.max_prompt_tokens
            if n > limit:
                raise RequestRejected(
                    400, f"the prompt has {n} tokens; this server accepts at most {limit}"
                )
            return out

        def generate(self, request, generation_args, progress_callback=None):
            try:
                ctx, responses = super().generate(request, generation_args, progress_callback)
            except Exception as e:
                _local.status = _status_for(e)
                raise
            # Across ranks only a batched generation can stop early (the stop is shared with
            # the other ranks); one served alone runs to its end (mlx-lm raises otherwise).
            stoppable = not self._is_distributed or (
                self._is_batchable(generation_args)
                and not any(_image_parts(getattr(request, "messages", None) or []))
            )
            conn = getattr(_local, "connection", None)
            return ctx, self._watch(ctx, responses, conn, stoppable)

        @staticmethod
        def _watch(ctx, responses: Iterator, conn, stoppable: bool = True) -> Iterator:
            """Pass responses through; stop the generation once the client has gone."""
            for r in responses:
                yield r
                if conn is not None and _peer_closed(conn):
                    if stoppable:
                        ctx.stop()
                    raise ConnectionAbortedError("client disconnected")

    class FlashmoeHandler(APIHandler):
        _status_override: int | None = None
        _echo_model: str | None = None

        def _begin(self) -> None:
            self._status_override = None
            _local.status = None
            _local.connection = self.connection

        def do_POST(self):
            self._begin()
            limit = self.response_generator.cli_args.max_request_bytes
            values = self.headers.get_all("Content-Length") or []
            if len(values) > 1 or (values and not _DIGITS.fullmatch(values[0].strip())):
                self.close_connection = True  # the body is not read: its length is unknown
                self._reply(400, {"error": "Content-Length must be one non-negative integer"})
                return
            length = int(values[0]) if values else 0
            if length > limit:
                self._discard_body(length)
                self._reply(413, {"error": f"request body over {limit} bytes"})
                return
            try:
                super().do_POST()
            except ConnectionError:
                logging.info("client disconnected; its generation was stopped")
                self.close_connection = True
            except GenerationFailed as e:
                self._fail_response(e)
            except UnicodeDecodeError as e:  # the stock handler decodes the body unchecked
                self.close_connection = True
                self._reply(400, {"error": f"request body is not valid UTF-8 (byte {e.start})"})

        def _fail_response(self, e: GenerationFailed) -> None:
            """Answer a request whose generation failed: 500, or an error event once streaming."""
            self.close_connection = True
            if getattr(self, "stream", False):
                self.wfile.write(f"data: {json.dumps({'error': str(e)})}\n\n".encode())
                self.wfile.flush()
            else:
                self._headers_buffer = []  # the 200 status line was buffered, not sent
                self._reply(500, {"error": str(e)})

        def do_GET(self):
            self._begin()
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/flashmoe/stats":
                self._reply(200, runtime_stats(self.response_generator.model_provider.runtime))
            elif path == "/v1/models":
                self._reply(200, {"object": "list", "data": [self._model_card()]})
            elif path.startswith("/v1/models/"):
                name = path[len("/v1/models/") :]
                if name in self.response_generator.model_provider.names:
                    self._reply(200, self._model_card())
                else:
                    self._reply(404, {"error": f"model {name!r} not found"})
            else:
                super().do_GET()

        def log_message(self, format: str, *args) -> None:
            logging.info("%s %s", self.address_string(), format % args)

        def _model_card(self) -> dict:
            name = self.response_generator.cli_args.model
            return {"id": name, "object": "model", "created": self.created, "owned_by": "flashmoe"}

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self._set_completion_headers(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()

        def _discard_body(self, length: int) -> None:
            """Read and drop a refused body (answering before the client has sent it all would
            reset the connection); past 64 MiB just close."""
            self.close_connection = True
            left = min(length, 64 * MiB)
            while left > 0:
                chunk = self.rfile.read(min(left, MiB))
                if not chunk:
                    break
                left -= len(chunk)

        def _set_completion_headers(self, status_code: int = 200):
            if status_code >= 400:
                status_code = (
                    self._status_override or getattr(_local, "status", None) or status_code
                )
            super()._set_completion_headers(status_code)

        def validate_model_parameters(self) -> None:
            vocab = self.response_generator.model_provider.vocab_size
            self.logit_bias = check_logit_bias(self.logit_bias, vocab)
            super().validate_model_parameters()
            check_request(self, self.body, self.path in _CHAT_PATHS, vocab)
            cli = self.response_generator.cli_args
            if self.max_tokens > cli.max_tokens_limit:
                raise ValueError(
                    f"max_tokens must be at most {cli.max_tokens_limit} (this server's limit)"
                )
            if self.adapter is not None:
                raise ValueError("adapters are not supported by flashmoe-serve")
            if self.requested_draft_model != "default_model":
                raise ValueError("draft models are not supported by flashmoe-serve")
            if self.requested_model not in self.response_generator.model_provider.names:
                self._status_override = 404
                raise ValueError(
                    f"model {self.requested_model!r} not found; this server serves "
                    f"{cli.model!r} (see /v1/models)"
                )
            # Every alias is the same model: keep them in one batch, echo the client's name.
            self._echo_model = self.requested_model
            self.requested_model = "default_model"

        def generate_response(self, *args, **kwargs) -> dict:
            return self._echo(super().generate_response(*args, **kwargs))

        def completion_usage_response(self, *args, **kwargs):
            return self._echo(super().completion_usage_response(*args, **kwargs))

        def _echo(self, response: dict) -> dict:
            if self._echo_model is not None:
                response["model"] = self._echo_model
            return response

    return FlashmoeModelProvider, FlashmoeResponseGenerator, FlashmoeHandler


def build_parser() -> argparse.ArgumentParser:
    from mlx_lm.utils import _parse_size

    p = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a flashmoe layout with mlx-lm's OpenAI-compatible HTTP API "
        "(/v1/chat/completions, /v1/completions, /v1/models), streaming routed experts from disk.",
    )
    add_runtime_options(p)
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    h.add_argument("--port", type=int, default=8080)
    h.add_argument(
        "--allowed-origins",
        type=lambda x: [o for o in x.split(",") if o],
        default=[],
        help="comma-separated CORS origins (default: none; '*' allows any web page)",
    )
    h.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    h.add_argument("--max-request-bytes", type=int, default=16 * MiB, help="larger bodies get 413")
    h.add_argument("--max-prompt-tokens", type=int, default=8192, help="longer prompts get 400")
    g = p.add_argument_group("generation (mlx_lm.server's options)")
    add_generation_options(g, max_tokens_help="max_tokens of a request that sets none", seed=False)
    g.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask"
    )
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument(
        "--chat-template-args",
        type=json.loads,
        default={},
        help="JSON arguments of apply_chat_template, e.g. '{\"enable_thinking\": false}'",
    )
    g.add_argument("--decode-concurrency", type=int, default=32, help="sequences decoded together")
    g.add_argument("--prompt-concurrency", type=int, default=8, help="prompts prefilled together")
    g.add_argument("--prefill-step-size", type=int, default=2048)
    g.add_argument("--prompt-cache-size", type=int, default=10, help="KV caches kept for reuse")
    g.add_argument("--prompt-cache-bytes", type=_parse_size, default=None)
    return p


# mlx_lm.server reads these from its namespace; flashmoe-serve does not offer them.
_FIXED = dict(
    adapter_path=None,
    draft_model=None,
    num_draft_tokens=3,
    trust_remote_code=False,
    chat_template="",
    use_default_chat_template=False,
    pipeline=False,
    kv_bits=None,  # quantized KV disables batching
    kv_group_size=64,
    quantized_kv_start=0,
)


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port {args.port} is not in 0..65535 (0: any free port)")
    for name in ("max_tokens", "max_tokens_limit", "max_prompt_tokens", "max_request_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_tokens > args.max_tokens_limit:
        raise ValueError("--max-tokens is larger than --max-tokens-limit")
    for name in ("decode_concurrency", "prompt_concurrency", "prefill_step_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


def kv_tokens(args: argparse.Namespace) -> int:
    """The KV-cache tokens to size the bank for: every decoded sequence at its longest."""
    return args.decode_concurrency * (args.max_prompt_tokens + args.max_tokens_limit)


def kv_note(args: argparse.Namespace) -> str:
    return (
        f"bank sized for a KV cache of {kv_tokens(args):,} tokens "
        f"({args.decode_concurrency} concurrent sequences (--decode-concurrency) x "
        f"{args.max_prompt_tokens + args.max_tokens_limit:,} tokens (--max-prompt-tokens + "
        "--max-tokens-limit)); lower them for a bigger bank"
    )


def resolve_address(host: str, port: int) -> tuple[int, tuple]:
    """``(family, address)`` to bind ``host:port``; ValueError (one line) if it does not resolve."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: {getattr(e, 'strerror', None) or e}") from None
    return family, address


# What every rank's generation loop must agree on (each tokenizes and batches on its own);
# bank, reader, trace and HTTP options may differ between ranks.
_SAME_ON_EVERY_RANK = (
    "k",
    "chat_template_args",
    "max_prompt_tokens",
    "max_tokens",
    "max_tokens_limit",
    "temp",
    "top_p",
    "min_p",
    "top_k",
    "decode_concurrency",
    "prompt_concurrency",
    "prefill_step_size",
    "prompt_cache_size",
    "prompt_cache_bytes",
)


def make_server(args: argparse.Namespace, model, tokenizer, group=None):
    """An HTTP server (not yet serving) and its response generator for a loaded pair.

    Across ranks (``group``: mlx-lm's distributed mode), rank 0 binds and every rank runs the
    generation loop; the others get no server (None). All first check that rank 0 could bind
    and that they serve with the same generation options."""
    from mlx_lm.models.cache import LRUPromptCache
    from mlx_lm.server import get_system_fingerprint

    # Before the generation thread starts: a bad --host must not leave it running.
    family, address = resolve_address(args.host, args.port)
    provider_cls, generator_cls, handler_cls = _server_classes()
    cli_args = argparse.Namespace(**{**_FIXED, **vars(args), "pipeline": group is not None})
    provider = provider_cls(cli_args, model, tokenizer)
    httpd = generator = None

    def fatal(e: BaseException) -> None:
        if group is None:  # across ranks, main() reports it in one line
            logging.critical("generation cannot run (%s); shutting down", error_line(e))
        if httpd is not None:
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    fingerprint = get_system_fingerprint()

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    def handler(*a, **kw):
        return handler_cls(generator, *a, system_fingerprint=fingerprint, **kw)

    def start_generator():
        return generator_cls(provider, LRUPromptCache(cli_args.prompt_cache_size), on_fatal=fatal)

    if group is None:
        generator = start_generator()
        try:
            httpd = Server(address, handler)
        except BaseException:
            generator.stop_and_join()
            raise
    else:
        from .group import agree

        httpd = agree(
            group,
            lambda: Server(address, handler) if group.rank() == 0 else None,
            identity=lambda _: repr([getattr(args, n) for n in _SAME_ON_EVERY_RANK]).encode(),
            discard=lambda server: server is not None and server.server_close(),
            what="starting the server",
            differs="server configuration",
            compared="generation options, ",
        )
        generator = start_generator()
    if generator.fatal is not None:  # it failed before the server existed to shut down
        if httpd is not None:
            httpd.server_close()
        raise RuntimeError(f"generation cannot run: {error_line(generator.fatal)}")
    return httpd, generator


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """``flashmoe-serve``; exit codes as every flashmoe command (``flashmoe.cli``): Ctrl-C shuts
    the server down cleanly, then exits 130.

    Under ``mlx.launch`` every rank runs this: the model is split across the ranks (``load``),
    rank 0 serves HTTP, and every rank runs mlx-lm's generation loop on its layers."""
    args = build_parser().parse_args(argv)
    from .group import world

    group = world()
    rank = 0 if group is None else group.rank()
    level = getattr(logging, args.log_level)
    logging.basicConfig(
        level=level if rank == 0 else max(level, logging.WARNING),
        format="%(asctime)s - %(levelname)s - %(message)s",
    )
    _check(args)
    resolve_address(args.host, args.port)  # fail before loading the model
    if not is_loopback(args.host) and rank == 0:
        print(
            f"{PROG}: warning: binding to {args.host} exposes the server to the network; "
            "it has no authentication and runs whatever prompts it receives",
            file=sys.stderr,
        )
    from .loader import load

    model, tokenizer = load(
        args.model,
        **load_options(args),
        max_kv_tokens=kv_tokens(args),
        kv_sequences=args.decode_concurrency,
        quiet=False,
        group=group,
    )
    if args.bank_experts is None and rank == 0:
        print(f"{PROG}: {kv_note(args)}", file=sys.stderr, flush=True)
    if group is not None:
        return _serve_ranks(args, model, tokenizer, group)
    httpd, generator = make_server(args, model, tokenizer)
    host, port = httpd.server_address[:2]
    print(f"{PROG}: serving {args.model} on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        generator.stop_and_join()
    if generator.fatal is not None:
        print(f"{PROG}: error: generation failed: {error_line(generator.fatal)}", file=sys.stderr)
        return 1
    return 0


def _serve_ranks(args: argparse.Namespace, model, tokenizer, group) -> int:
    """Serve across ranks until rank 0 stops (Ctrl-C, or its generation loop fails): rank 0
    then stops every rank's loop (shared as a request), all exit with its code. A rank that
    dies or stops answering ends the others (the watchdog, or MLX's lost connection: exit 2,
    one line from rank 0)."""
    from .group import LOST_LINE, RankError, barrier, lost_connection, reporting, waiting

    rank, rt = group.rank(), model.flashmoe
    # a lost rank can also surface outside the generation loop (a barrier, the stop)
    with reporting(group):
        finished = False
        try:
            httpd, generator = make_server(args, model, tokenizer, group)
            progress = lambda: (rt.store.stats.calls, generator.rounds)  # noqa: E731
            code = 0
            with waiting("serving", rank=rank, progress=progress):
                if httpd is None:
                    code = _follow(generator)
                else:
                    host, port = httpd.server_address[:2]
                    print(
                        f"{PROG}: serving {args.model} on http://{host}:{port} ({group.size()} ranks)",
                        file=sys.stderr,
                        flush=True,
                    )
                    try:
                        httpd.serve_forever()
                    except KeyboardInterrupt:
                        code = 130
                    finally:
                        httpd.server_close()
                        generator.stop_and_join(code if generator.fatal is None else 1)
            if generator.fatal is not None:
                if lost_connection(generator.fatal):
                    raise RankError(LOST_LINE, silent=rank != 0)
                print(
                    f"{_prog(rank)}: error: generation failed: {error_line(generator.fatal)}",
                    file=sys.stderr,
                )
                return 1
            barrier(group, "finishing")
            finished = True
        finally:
            rt.close(gather=finished)  # rank 0's --trace gets every rank's layers
    if rank == 0 and code == 130:
        raise KeyboardInterrupt  # "interrupted", as one process
    return code if rank == 0 else generator.stop_code or 0


def _follow(generator) -> int:
    """A rank other than 0: run the generation loop until rank 0 stops it. A Ctrl-C (which
    reaches every rank under ``mlx.launch``) waits a few seconds for rank 0's stop first."""
    import signal
    import time

    interrupted: list[float] = []

    def on_sigint(signum, frame) -> None:  # no exception: an interrupted join() is unreliable
        interrupted.append(time.monotonic())

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        thread = generator._generation_thread
        while thread.is_alive():
            thread.join(0.2)
            if interrupted and time.monotonic() - interrupted[0] > _STOP_WAIT_S:
                from ..cli import EXIT_INTERRUPTED
                from .group import say

                say(f"{_prog(generator._rank)}: interrupted")
                os._exit(EXIT_INTERRUPTED)  # its loop waits on rank 0: it cannot be joined
    finally:
        signal.signal(signal.SIGINT, previous)
    return generator.stop_code or 0


def _prog(rank: int) -> str:
    return PROG if rank == 0 else f"{PROG} (rank {rank})"


if __name__ == "__main__":
    sys.exit(main())
