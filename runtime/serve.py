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
import select
import socket
import sys
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

from .options import add_runtime_options, error_line, load_options

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


def _status_for(e: Exception) -> int:
    if isinstance(e, RequestRejected):
        return e.status
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
    """The expert store's counters (since the server started) and the bank geometry."""
    s = runtime.store.stats
    return {
        "hits": s.hits,
        "misses": s.misses,
        "hit_rate": s.hit_rate,
        "bytes_read": s.bytes_read,
        "io_seconds": s.io_seconds,
        "calls": s.calls,
        "bank_experts": runtime.slots,
        "num_experts": runtime.index.num_experts,
        "moe_layers": len(runtime.index.layers),
        "expert_bytes": runtime.index.expert_bytes,
        "top_k": runtime.top_k,
    }


def _server_classes():
    """The subclasses of mlx_lm.server's classes (imported lazily: mlx_lm.server is heavy)."""
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator

    class FlashmoeModelProvider(ModelProvider):
        """Serves the one streamed model it was given; ``model`` names are aliases of it."""

        def __init__(self, cli_args: argparse.Namespace, model, tokenizer):
            super().__init__(cli_args)
            self._pair = (model, tokenizer)
            self.runtime = model.flashmoe
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
            return ctx, self._watch(ctx, responses, getattr(_local, "connection", None))

        @staticmethod
        def _watch(ctx, responses: Iterator, conn) -> Iterator:
            """Pass responses through; stop the generation once the client has gone."""
            for r in responses:
                yield r
                if conn is not None and _peer_closed(conn):
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
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = 0  # the stock handler answers 400
            if length > limit:
                self._discard_body(length)
                self._reply(413, {"error": f"request body over {limit} bytes"})
                return
            try:
                super().do_POST()
            except ConnectionError:
                logging.info("client disconnected; its generation was stopped")
                self.close_connection = True

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
            super().validate_model_parameters()
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
    g.add_argument("--max-tokens", type=int, default=512, help="default max_tokens of a request")
    g.add_argument(
        "--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask"
    )
    g.add_argument("--temp", type=float, default=0.0, help="default sampling temperature")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
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


def make_server(args: argparse.Namespace, model, tokenizer):
    """An HTTP server (not yet serving) and its response generator for a loaded pair."""
    from mlx_lm.models.cache import LRUPromptCache
    from mlx_lm.server import get_system_fingerprint

    provider_cls, generator_cls, handler_cls = _server_classes()
    cli_args = argparse.Namespace(**{**_FIXED, **vars(args)})
    provider = provider_cls(cli_args, model, tokenizer)
    generator = generator_cls(provider, LRUPromptCache(cli_args.prompt_cache_size))
    fingerprint = get_system_fingerprint()

    family, _, _, _, address = socket.getaddrinfo(
        args.host, args.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(ThreadingHTTPServer):
        address_family = family
        daemon_threads = True

    def handler(*a, **kw):
        return handler_cls(generator, *a, system_fingerprint=fingerprint, **kw)

    try:
        httpd = Server(address, handler)
    except BaseException:
        generator.stop_and_join()
        raise
    return httpd, generator


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s - %(levelname)s - %(message)s"
    )
    try:
        _check(args)
        if not is_loopback(args.host):
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
        )
        if args.bank_experts is None:
            print(f"{PROG}: {kv_note(args)}", file=sys.stderr, flush=True)
        httpd, generator = make_server(args, model, tokenizer)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        print(f"{PROG}: error: {error_line(e)}", file=sys.stderr)
        return 2
    host, port = httpd.server_address[:2]
    print(f"{PROG}: serving {args.model} on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        generator.stop_and_join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
