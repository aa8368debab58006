"""flashmoe-chat's session: the KV cache reused up to where a re-rendered answer diverges, and the
statistics of an interrupted turn."""

from __future__ import annotations

import io

import pytest
from flashmoe.runtime.chat import ChatSession, build_parser
from test_chat import P1, P2, stock_answer


@pytest.fixture(scope="module")
def session(layout):
    from flashmoe.runtime import load

    src, out = layout("qwen3_moe")  # attention only: a trimmable KV cache
    model, tok = load(str(out), bank_experts=6)
    return src, ChatSession(model, tok, build_parser().parse_args([str(out)]))


def test_cache_is_cut_back_to_the_common_prefix(session):
    src, s = session
    s.reset()
    s.args.max_tokens = 12
    first = io.StringIO()
    s.reply(P1, first, "")
    cached = list(s.cached)
    # The template renders the previous answer otherwise than it was generated (as Qwen3's drops
    # a thinking block): here, the answer's second half is gone.
    answer = first.getvalue()[:-1]
    s.messages[-1]["content"] = answer[: len(answer) // 2]
    second = io.StringIO()
    s.reply(P2, second, "")
    full = s.tokenizer.apply_chat_template(s.messages[:-1], add_generation_prompt=True)
    common = next(i for i, (a, b) in enumerate(zip(full, cached, strict=False)) if a != b)
    assert 0 < common < len(cached)
    assert s.last.prompt_tokens == len(full) - common  # the shared prefix was not prefilled again
    messages = [
        {"role": "user", "content": P1},
        {"role": "assistant", "content": answer[: len(answer) // 2]},
        {"role": "user", "content": P2},
    ]
    assert second.getvalue() == stock_answer(src, messages, 12) + "\n"


class InterruptingWriter(io.StringIO):
    """A terminal where Ctrl-C arrives as the first answer text is printed."""

    def write(self, s: str) -> int:
        if s.strip() and "[interrupted]" not in s:
            raise KeyboardInterrupt
        return super().write(s)


def test_interrupted_turn_statistics(session):
    _, s = session
    s.reset()
    s.args.max_tokens = 8
    stats = s.reply(P1, InterruptingWriter(), "")
    assert stats.prompt_tokens > 0 and stats.prompt_seconds > 0  # not counted at 0 s
    assert stats.tokens == 0
    assert "prompt" in s.stats_lines()[0] and " at 0.0 tok/s" not in s.stats_lines()[0]
    out = io.StringIO()
    s.reply(P2, out, "")  # the session goes on
    assert out.getvalue().strip()
