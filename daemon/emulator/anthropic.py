"""Anthropic's Messages API as Ollama answers it (``POST /v1/messages``): the request read
as a chat, the answer as a message or as Anthropic's named SSE events.

Read from ollama's ``middleware/anthropic.go`` and ``anthropic/anthropic.go``: the same
checks in the same order and words, a ``msg_`` id of 24 hex digits, the events its
stream converter sends (``message_start`` with an estimate of the input tokens, one text
block, ``message_delta`` with the stop reason and the counts, ``message_stop``; no
``ping``), and errors as ``{"type": "error", "error": {"type", "message"}}``. Pure.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

from daemon.emulator import formats as fmt
from daemon.emulator.formats import Job, Reject

# Anthropic's error types by status, as ollama's anthropic.NewError names them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_STOP = {"stop": "end_turn", "length": "max_tokens"}


def error(status: int, message: str) -> dict[str, Any]:
    kind = _TYPES.get(status, "api_error")
    request_id = "req_" + secrets.token_hex(12)
    return {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}


def _text(content: Any) -> str:
    """A message's or the system prompt's text: a string, or its text blocks joined."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            parts.append(_text(block.get("content")))
    return "".join(parts)


def parse(body: dict[str, Any]) -> Job:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Reject(400, "model is required")
    limit = body.get("max_tokens")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
        raise Reject(400, "max_tokens is required and must be positive")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Reject(400, "messages is required")
    chat: list[dict[str, Any]] = []
    system = _text(body.get("system"))
    if system:
        chat.append({"role": "system", "content": system})
    for message in messages:
        if isinstance(message, dict):
            chat.append({"role": message.get("role"), "content": _text(message.get("content"))})
    stream = body.get("stream") is True
    job = fmt.parse_job(
        "chat",
        {"model": model, "messages": chat, "stream": stream, "options": {"num_predict": limit}},
    )
    estimate = fmt.prompt_tokens(job.prompt)  # message_start's count, before the real one
    return dataclasses.replace(
        job, kind="messages", rid="msg_" + secrets.token_hex(12), extra={"estimate": estimate}
    )


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + fmt.dumps(data) + b"\n\n"


def _start(job: Job) -> bytes:
    message = {
        "id": job.rid,
        "type": "message",
        "role": "assistant",
        "model": job.model,
        "content": [],
        "usage": {"input_tokens": job.extra.get("estimate", 0), "output_tokens": 0},
    }
    return _event("message_start", {"type": "message_start", "message": message})


def chunk(job: Job, token: str) -> bytes:
    """One token as events: the message and its text block open with the first."""
    out = b""
    if job.events == 0:
        start: dict[str, Any] = {"type": "content_block_start", "index": 0}
        start["content_block"] = {"type": "text", "text": ""}
        out = _start(job) + _event("content_block_start", start)
    job.events += 1
    delta = {"type": "text_delta", "text": token}
    return out + _event(
        "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
    )


def closing(job: Job, reason: str, stats: dict[str, int]) -> bytes:
    """The events that end a stream: the text block's stop, the counts, the end."""
    out = _start(job) if job.events == 0 else b""
    if job.events:
        out += _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    usage = {
        "input_tokens": stats.get("prompt_eval_count", 0),
        "output_tokens": stats.get("eval_count", 0),
    }
    stop = {"stop_reason": _STOP.get(reason, "stop_sequence")}
    delta = {"type": "message_delta", "delta": stop, "usage": usage}
    return out + _event("message_delta", delta) + _event("message_stop", {"type": "message_stop"})


def final(job: Job, text: str, reason: str, stats: dict[str, int]) -> dict[str, Any]:
    """The whole message (Go leaves out an empty stop_sequence)."""
    body: dict[str, Any] = {"id": job.rid, "type": "message", "role": "assistant"}
    body["model"] = job.model
    body["content"] = [{"type": "text", "text": text}] if text else []
    body["stop_reason"] = _STOP.get(reason, "stop_sequence")
    body["usage"] = {
        "input_tokens": stats.get("prompt_eval_count", 0),
        "output_tokens": stats.get("eval_count", 0),
    }
    return body
