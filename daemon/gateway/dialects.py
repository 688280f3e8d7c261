"""The three wire dialects olmd answers in: Ollama's, OpenAI's (under ``/v1``) and
Anthropic's (``/v1/messages``). Which one a path speaks, every error olmd answers itself
in that dialect's shape (a refusal, a bad body, no node, a 429), the text for a model no
node holds, and the one error line that ends a stream a node cut.

Ollama's errors are ``{"error": "..."}``; OpenAI's ``{"error": {"message", "type",
"param", "code"}}``; Anthropic's ``{"type": "error", "error": {"type", "message"}}``,
its type named by the status as Anthropic's API names it (the SDK reads the status).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from aiohttp import web

from daemon.gateway.wire import json_error, openai_error
from daemon.tenancy.limits import Refusal

Dialect = Literal["ollama", "openai", "anthropic"]
ErrorReply = Callable[..., web.Response]

ANTHROPIC_PATH = "/v1/messages"
# Anthropic's error types by status (docs.anthropic.com, "Errors"); others by class.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def dialect_of(path: str) -> Dialect:
    """The dialect of a (normalised) path: Anthropic's for ``/v1/messages`` and below,
    OpenAI's for the rest of ``/v1``, Ollama's elsewhere."""
    if path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/"):
        return "anthropic"
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    return "ollama"


def anthropic_error(status: int, message: str, **headers: str) -> web.Response:
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


_ERRORS: dict[Dialect, ErrorReply] = {
    "ollama": json_error,
    "openai": openai_error,
    "anthropic": anthropic_error,
}


def error_for(dialect: Dialect) -> ErrorReply:
    """``error(status, message, **headers)`` in the dialect's shape."""
    return _ERRORS[dialect]


def model_not_found(dialect: Dialect, name: str) -> web.Response:
    """A 404 for a model no node holds, in the words each API's clients match on: Ollama's
    own (``ollama`` clients offer a pull on it), OpenAI's ``model_not_found``, Anthropic's."""
    if dialect == "openai":
        message = f"The model `{name}` does not exist or you do not have access to it."
        body = {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        }
        return web.json_response(body, status=404)
    if dialect == "anthropic":
        return anthropic_error(404, f"model: {name}")
    return json_error(404, f'model "{name}" not found, try pulling it first')


def rate_limited(refusal: Refusal, dialect: Dialect, headers: Mapping[str, str]) -> web.Response:
    """429 with ``Retry-After`` and the rate-limit headers, in the route's dialect: under
    ``/v1`` OpenAI's ``rate_limit_exceeded`` (``insufficient_quota`` for a spent budget),
    which its SDK reads as ``RateLimitError`` and retries by itself; Anthropic's
    ``rate_limit_error``, which its SDK reads the same way."""
    extra = {**headers, "Retry-After": str(max(1, math.ceil(refusal.retry_after)))}
    if dialect != "openai":
        return error_for(dialect)(429, refusal.message, **extra)
    # As OpenAI answers: the type names the limit, the code what happened.
    code = "insufficient_quota" if refusal.quota else "rate_limit_exceeded"
    kind = "insufficient_quota" if refusal.quota else refusal.limit
    body = {"error": {"message": refusal.message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=429, headers=extra)


def cut_line(dialect: Dialect, sse: bool, events: bool, message: str) -> bytes:
    """The error line that ends a cut stream, in the stream's own format: an NDJSON line,
    an SSE ``data:`` line (OpenAI's chat streams), or an ``event: error`` (the streams that
    name their events: Anthropic's, and OpenAI's Responses)."""
    if not sse:
        return json.dumps({"error": message}).encode() + b"\n"
    if dialect == "anthropic":
        anthropic = {"type": "error", "error": {"type": "api_error", "message": message}}
        return b"event: error\ndata: " + json.dumps(anthropic).encode() + b"\n\n"
    if events:
        body: dict[str, Any] = {"type": "error", "code": "server_error", "message": message}
        body["param"] = None
        return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
    error = {"error": {"message": message, "type": "server_error"}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


async def final_error(response: web.StreamResponse, line: bytes) -> None:
    """End a cut stream with ``line`` (see :func:`cut_line`), if the client is there.

    A body of announced length cannot carry an extra line: its connection is closed, and
    the client sees a short read.
    """
    if response.content_length is not None:
        response.force_close()
        return
    try:
        await response.write(line)
        await response.write_eof()
    except ConnectionResetError:
        pass
