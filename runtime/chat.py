"""``flashmoe-chat``: an interactive multi-turn chat in the terminal on a streamed model.

Built on mlx-lm's ``stream_generate``, ``make_prompt_cache`` and ``make_sampler`` (``mlx_lm.chat``
itself loads with ``mlx_lm.load`` and keeps no message history, so its loop is not reusable). The
conversation is kept as messages and rendered with the chat template each turn; the KV cache is
reused for the prefix the new rendering shares with the tokens already in it (cut back to it when
the cache can be trimmed; a linear-attention cache that cannot be is rebuilt when they diverge).

Under ``mlx.launch`` the model is split across the ranks (``load``) and every rank runs the same
session: rank 0 reads the terminal and prints, and shares each line (an event) with the others,
which answer it with output to nowhere; while the user types, rank 0 shares an idle event every
second, so the watchdog (``group.py``) still sees a rank that vanished. A Ctrl-C stops an answer
at the same token on every rank: each step's sampler adds up the ranks' Ctrl-C flags
(``mx.distributed.all_sum``, in the step's graph, ordered with the pipeline's own transfers) and
ends the answer (an end-of-sequence token, not printed) when any is set.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass

from ..cli import command, error_line, is_user_error
from .options import (
    add_generation_options,
    add_runtime_options,
    check_prompt_length,
    load_options,
)

PROG = "flashmoe-chat"
HELP = "commands: /reset (new conversation)  /stats  /help  /quit;  Ctrl-C stops an answer"
GREY, RESET = "\033[90m", "\033[0m"


class ThinkingPrinter:
    """Writes streamed text, the parts between ``start`` and ``end`` markers in ``style``.

    Text that could be the beginning of a marker split across chunks is held back until the
    next chunk (or ``close``) decides.
    """

    def __init__(self, out, start: str | None, end: str | None, style: str, thinking=False):
        self.out = out
        self.markers = {m: m == start for m in (start, end) if m}
        self.style = style
        self.thinking = thinking
        self._held = ""
        if thinking:
            self._emit(self.style)

    def _emit(self, s: str) -> None:
        if s:
            self.out.write(s)

    def write(self, text: str) -> None:
        text = self._held + text
        self._held = ""
        while text:
            hits = [(text.find(m), m) for m in self.markers if m in text]
            if hits:
                pos, marker = min(hits)
                self._emit(text[:pos])
                self._switch(self.markers[marker], marker)
                text = text[pos + len(marker) :]
                continue
            keep = max(
                (n for m in self.markers for n in range(1, len(m)) if text.endswith(m[:n])),
                default=0,
            )
            self._emit(text[: len(text) - keep])
            self._held = text[len(text) - keep :]
            break
        self.out.flush()

    def _switch(self, thinking: bool, marker: str) -> None:
        if thinking and not self.thinking:
            self._emit(self.style + marker)
        elif not thinking and self.thinking:
            self._emit(marker + RESET)
        else:
            self._emit(marker)
        self.thinking = thinking

    def close(self) -> None:
        self._emit(self._held)
        self._held = ""
        if self.thinking and self.style:
            self._emit(RESET)
        self.out.flush()


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    tokens: int = 0  # decoded after the first token, which ends the prompt's processing
    seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0

    def add(self, other: TurnStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def line(self, label: str) -> str:
        looked = self.hits + self.misses
        rate = f"{self.hits / looked * 100:.1f}%" if looked else "n/a"
        tps = self.tokens / self.seconds if self.seconds else 0.0
        ptps = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        per_token = self.bytes_read / self.tokens / 1e6 if self.tokens else 0.0
        return (
            f"{label}: {self.tokens} tokens at {tps:.2f} tok/s, prompt {self.prompt_tokens} "
            f"tokens at {ptps:.1f} tok/s; decode: bank hit rate {rate}, "
            f"{per_token:.2f} MB read per token"
        )


class ChatSession:
    """Messages, the KV cache over their tokens, and per-turn statistics."""

    def __init__(self, model, tokenizer, args: argparse.Namespace, group=None):
        from mlx_lm.sample_utils import make_sampler

        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.sampler = make_sampler(args.temp, args.top_p, min_p=args.min_p)
        self.group = group  # the ranks of a pipelined model, else None
        self.interrupted = False  # across ranks: a Ctrl-C seen on this rank (see run_ranks)
        self.last: TurnStats | None = None
        self.total = TurnStats()
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = []
        if self.args.system_prompt:
            self.messages.append({"role": "system", "content": self.args.system_prompt})
        self.cache = None
        self.cached: list[int] = []

    def _render(self) -> list[int]:
        tok = self.tokenizer
        if tok.chat_template is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in self.messages)
            return tok.encode(text + "assistant: ")
        return tok.apply_chat_template(
            self.messages, add_generation_prompt=True, **self.args.chat_template_args
        )

    def _starts_thinking(self, prompt: list[int]) -> bool:
        tok = self.tokenizer
        if not getattr(tok, "has_thinking", False):
            return False
        return tok.rfind_think_start(prompt) > tok.rfind_think_end(prompt)

    def reply(self, text: str, out, style: str) -> TurnStats:
        """Stream the answer to ``text``; KeyboardInterrupt stops it (the session stays usable)."""
        from mlx_lm import stream_generate
        from mlx_lm.models.cache import make_prompt_cache

        self.messages.append({"role": "user", "content": text})
        try:
            full = self._render()
            check_prompt_length(self.model, len(full), "the conversation")
        except BaseException:
            self.messages.pop()
            raise
        rest = self._reuse(full)
        if rest is None:
            self.cache, rest = make_prompt_cache(self.model), full
        store = self.model.flashmoe.store.stats
        before = (store.hits, store.misses, store.bytes_read)
        printer = ThinkingPrinter(
            out,
            getattr(self.tokenizer, "think_start", None),
            getattr(self.tokenizer, "think_end", None),
            style,
            thinking=self._starts_thinking(full),
        )
        stats, answer, generated = TurnStats(prompt_tokens=len(rest)), [], []
        start = decode_start = time.perf_counter()
        interrupted = False
        sampler, stops = self._sampler()
        try:
            for r in stream_generate(
                self.model,
                self.tokenizer,
                rest,
                max_tokens=self.args.max_tokens,
                sampler=sampler,
                prompt_cache=self.cache,
            ):
                generated.append(r.token)
                answer.append(r.text)
                if len(generated) == 1:  # the prompt is done: decode statistics from here
                    stats.prompt_seconds = time.perf_counter() - start
                    decode_start = time.perf_counter()
                    before = (store.hits, store.misses, store.bytes_read)
                printer.write(r.text)
        except KeyboardInterrupt:
            interrupted = True
            if not generated:  # stopped during the prompt: its time is the prompt's
                stats.prompt_seconds = time.perf_counter() - start
        except BaseException:  # a read error, ...: this turn did not happen, the rest stays
            self.messages.pop()
            self.cache, self.cached = None, []
            raise
        finally:
            printer.close()
        if stops is not None and len(stops) > len(generated):  # the token that ended it
            interrupted = stops[len(generated)].item() > 0
        if interrupted:
            out.write(f"\n{style}[interrupted]{RESET if style else ''}")
            self.cache, self.cached = None, []  # a cache stopped mid-step is not trusted
        else:
            self.cached = (full + generated)[: self._cache_length(len(full) + len(generated))]
        out.write("\n")
        out.flush()
        # The first token's time is the prompt's (prefill); the rest is decode.
        stats.tokens = max(len(generated) - 1, 0)
        stats.seconds = time.perf_counter() - decode_start if generated else 0.0
        self.messages.append({"role": "assistant", "content": "".join(answer)})
        stats.hits = store.hits - before[0]
        stats.misses = store.misses - before[1]
        stats.bytes_read = store.bytes_read - before[2]
        self._account(stats)
        return stats

    def _sampler(self):
        """The sampler, and across ranks the list its steps append their summed Ctrl-C flags
        to (None in one process, where a Ctrl-C raises KeyboardInterrupt)."""
        if self.group is None:
            return self.sampler, None
        import mlx.core as mx

        eos_ids = sorted(self.tokenizer.eos_token_ids)
        if not eos_ids:
            raise ValueError("the tokenizer has no end-of-sequence token to stop an answer with")
        stops: list = []

        def sample(logprobs):
            token = self.sampler(logprobs)
            flag = mx.array(int(self.interrupted), dtype=mx.int32)
            stop = mx.distributed.all_sum(flag, group=self.group)
            stops.append(stop)
            return mx.where(stop > 0, mx.array(eos_ids[0], dtype=token.dtype), token)

        return sample, stops

    def _reuse(self, full: list[int]) -> list[int] | None:
        """The tokens of ``full`` still to prefill on the current KV cache, or None to rebuild it.

        The cache holds ``self.cached``. When ``full`` extends it, only the new tokens are fed;
        when they diverge (the template re-renders the last answer differently) a trimmable
        cache (attention KV) is cut back to the common prefix. A cache that cannot be trimmed
        (linear-attention state, e.g. Qwen3.5) is rebuilt.
        """
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cached = self.cached
        if self.cache is None or not cached:
            return None
        n = 0
        for a, b in zip(full, cached, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(full) - 1)  # at least one token is fed
        if n <= 0:
            return None
        if n < len(cached):
            if not can_trim_prompt_cache(self.cache):
                return None
            trim_prompt_cache(self.cache, len(cached) - n)
            self.cached = cached[:n]
        return full[n:]

    def _cache_length(self, default: int) -> int:
        """Tokens held by the KV cache (stream_generate feeds every token it yields)."""
        for c in self.cache or []:
            offset = getattr(c, "offset", None)
            if isinstance(offset, int):
                return offset
        return default

    def _account(self, s: TurnStats) -> None:
        self.last = s
        self.total.add(s)

    def stats_lines(self) -> list[str]:
        if self.last is None:
            return ["no answer yet"]
        rt = self.model.flashmoe
        layers = f"{len(rt.index.layers)} MoE layers"
        if rt.plan is not None:  # the store's figures are this rank's
            stage = rt.plan.stages[rt.rank]
            layers = (
                f"{len(stage.moe_layers)} of {len(rt.index.layers)} MoE layers (rank "
                f"{rt.rank}'s, layers {stage.start}-{stage.stop - 1}: the figures above are its)"
            )
        return [
            self.last.line("last answer"),
            self.total.line("session"),
            f"bank: {rt.slots} of {rt.index.num_experts} experts per layer, {layers}",
        ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Chat in the terminal with a flashmoe layout, streaming the routed experts "
        "from disk.",
    )
    add_runtime_options(p)
    g = p.add_argument_group("generation")
    g.add_argument("--system-prompt", default=None)
    add_generation_options(g, max_tokens_help="tokens per answer at most")
    g.add_argument(
        "--chat-template-args",
        type=json.loads,
        default={},
        help="JSON arguments of apply_chat_template, e.g. '{\"enable_thinking\": false}'",
    )
    return p


def _read(prompt: str) -> str | None:
    """One line of input; None at end of input. Ctrl-C at the prompt only prints a hint, and a
    line that is not UTF-8 is refused (the conversation goes on)."""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return None
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit to leave)")
            continue
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # stdin decodes with surrogateescape (see run)
            print("(that line is not valid UTF-8; type it again)", flush=True)
            continue
        return line


def _local(session: ChatSession, text: str, out) -> bool:
    """Handle a line that only prints (a command, or nothing); False for one that changes the
    session (a message, /reset, /quit)."""
    if not text:
        return True
    if text == "/stats":
        for s in session.stats_lines():
            print(s, file=out, flush=True)
    elif text in ("/help", "/?"):
        print(HELP, file=out, flush=True)
    elif text.startswith("/") and " " not in text and text not in ("/quit", "/exit", "/reset"):
        print(f"unknown command {text}; {HELP}", file=out, flush=True)
    else:
        return False
    return True


def _apply(session: ChatSession, text: str, out, style: str) -> bool:
    """Apply a line that changes the session; False when it ends the chat."""
    if text in ("/quit", "/exit"):
        return False
    if text == "/reset":
        session.reset()
        print("(new conversation)", file=out, flush=True)
        return True
    try:
        session.reply(text, out, style)
    except Exception as e:
        if not is_user_error(e):
            raise  # a bug: the wrapper reports it (FLASHMOE_DEBUG=1 for the traceback)
        print(
            f"{PROG}: error: {error_line(e)} (that turn was dropped; the conversation is kept)",
            file=out,
            flush=True,
        )
    return True


def _reconfigure_stdin() -> None:
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # bad bytes reach _read, not a traceback


def run(session: ChatSession, out=sys.stdout, color: bool = True) -> int:
    style = GREY if color else ""
    _reconfigure_stdin()
    print(HELP, file=out, flush=True)
    while True:
        line = _read("> ")
        if line is None:
            out.write("\n")
            return 0
        text = line.strip()
        if not _local(session, text, out) and not _apply(session, text, out, style):
            return 0


# ----------------------------------------------------------------------------- across ranks
IDLE_EVENT_S = 1.0  # while the user types, rank 0 shares an idle event this often


class _Lines:
    """Rank 0's terminal: a thread reads lines (``input``, with readline) one at a time, each
    after the previous one was handled, so the main thread can share idle events meanwhile."""

    def __init__(self):
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._handled = threading.Event()
        self._handled.set()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            self._handled.wait()
            self._handled.clear()
            line = _read("> ")
            self._lines.put(line)
            if line is None:
                return

    def next_event(self, session: ChatSession, out) -> str:
        """The next line that changes the session ("/quit" at the end of input), or "" after
        ``IDLE_EVENT_S`` without one; lines that only print are handled here."""
        deadline = time.monotonic() + IDLE_EVENT_S
        while True:
            if session.interrupted:  # a Ctrl-C at the prompt, as in one process
                session.interrupted = False
                print("\n(Ctrl-D or /quit to leave)", file=out, flush=True)
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return ""
            if line is None:
                out.write("\n")
                return "/quit"
            text = line.strip()
            if not _local(session, text, out):
                return text
            self.handled()

    def handled(self) -> None:
        self._handled.set()


def run_ranks(session: ChatSession, group, out=sys.stdout, color: bool = True) -> int:
    """The chat on every rank of ``group``: rank 0 reads and prints, the others follow; ends
    on every rank at the end of rank 0's input or its /quit."""
    from .group import gather_bytes, waiting

    rank = group.rank()
    style = GREY if color else ""
    stats = session.model.flashmoe.store.stats

    def on_sigint(signum, frame) -> None:  # every rank gets a terminal's Ctrl-C
        session.interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        lines = None
        if rank == 0:
            _reconfigure_stdin()
            print(HELP, file=out, flush=True)
            lines = _Lines()
        while True:
            mine = lines.next_event(session, out) if lines is not None else ""
            (text,) = gather_bytes(group, mine.encode(), "waiting for rank 0's next line")[:1]
            text = text.decode()
            if not text:
                continue
            session.interrupted = False  # a Ctrl-C before this line is not for its answer
            with waiting("answering", rank=rank, progress=lambda: stats.calls):
                if not _apply(session, text, out, style):
                    return 0
            session.interrupted = False  # the Ctrl-C that stopped it, if any, is spent
            if lines is not None:
                lines.handled()
    finally:
        signal.signal(signal.SIGINT, previous)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """``flashmoe-chat``; exit codes as every flashmoe command (``flashmoe.cli``)."""
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        raise ValueError("--max-tokens must be at least 1")
    from .group import world
    from .loader import load

    group = world()
    model, tokenizer = load(args.model, **load_options(args), quiet=False, group=group)
    if group is not None:
        return _chat_ranks(args, model, tokenizer, group)
    if args.seed is not None:
        import mlx.core as mx

        mx.random.seed(args.seed)
    session = ChatSession(model, tokenizer, args)
    _line_editing()
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(f"{PROG}: {args.model}", flush=True)
    return run(session, color=color)


def _line_editing() -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass


def _chat_ranks(args: argparse.Namespace, model, tokenizer, group) -> int:
    """``main`` under ``mlx.launch``: the same options and seed on every rank, then
    ``run_ranks``; rank 0's --trace gathers every rank's layers at the end."""
    import mlx.core as mx

    from .group import agree, barrier, reporting, shared_seed

    rank = group.rank()
    finished = False
    try:
        with reporting(group):
            same = (args.system_prompt, args.temp, args.top_p, args.min_p, args.max_tokens)
            agree(
                group,
                lambda: None,
                identity=lambda _: repr([*same, args.chat_template_args]).encode(),
                what="comparing the chat options",
                differs="chat configuration",
                compared="generation options, ",
            )
            mx.random.seed(shared_seed(group, args.seed))  # every rank samples the same
            if rank == 0:
                session = ChatSession(model, tokenizer, args, group)
                _line_editing()
                color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
                print(f"{PROG}: {args.model} ({group.size()} ranks)", flush=True)
                code = run_ranks(session, group, color=color)
            else:
                with open(os.devnull, "w") as null:
                    session = ChatSession(model, tokenizer, args, group)
                    code = run_ranks(session, group, out=null, color=False)
            barrier(group, "finishing")
            finished = True
    finally:
        model.flashmoe.close(gather=finished)
    return code


if __name__ == "__main__":
    sys.exit(main())
