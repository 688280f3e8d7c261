"""Token counts read from the tail of a response without parsing it."""

from __future__ import annotations

import json

from daemon.gateway.wire import usage_from_tail


def test_ollama_final_chunk_with_a_long_context() -> None:
    final = {
        "model": "m",
        "response": "",
        "done": True,
        "context": list(range(5000)),
        "prompt_eval_count": 26,
        "eval_count": 290,
        "eval_duration": 4_709_213_000,
    }
    tail = b'{"response":"x","done":false}\n' + json.dumps(final, separators=(",", ":")).encode()
    assert usage_from_tail(tail + b"\n") == (26, 290, 4_709_213_000)


def test_openai_usage_before_done() -> None:
    usage = {"usage": {"prompt_tokens": 7, "completion_tokens": 12, "total_tokens": 19}}
    tail = b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"
    assert usage_from_tail(tail) == (7, 12, 0)


def test_lookalikes_inside_text_do_not_count() -> None:
    chunk = json.dumps({"response": 'say "eval_count":99', "done": False}).encode()
    assert usage_from_tail(chunk) is None
    assert usage_from_tail(b"") is None
    assert usage_from_tail(b'{"eval_count":') is None
