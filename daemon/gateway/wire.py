"""The proxy's wire details: which headers pass, Ollama's and OpenAI's error bodies (all
three dialects' shapes are in ``dialects``), and token counts read from a response's tail."""

from __future__ import annotations

import json

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping

from daemon.gateway.routing.rates import Sample

# RFC 9110 §7.6.1: meant for one connection, never forwarded (nor the headers that a
# Connection header names, see _named_by_connection).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Framing and addressing aiohttp sets itself for the next hop, and olmd's own headers.
_OWN = frozenset({"host", "content-length", "x-olmd-node", "x-olmd-route"})
# Request headers not copied: hop-by-hop, credentials, and the one olmd rewrites.
SKIP_REQUEST = frozenset(
    {*HOP_BY_HOP, *_OWN, "authorization", "x-api-key", "cookie", "x-forwarded-for"}
)
# Response headers not copied: hop-by-hop, and those aiohttp sets itself.
SKIP_RESPONSE = frozenset({*HOP_BY_HOP, *_OWN, "date", "server"})


def _named_by_connection(headers: MultiMapping[str]) -> frozenset[str]:
    """Header names listed in ``Connection`` (``Connection: close, X-Trace``): hop-by-hop
    too. Only called when there is a Connection header."""
    names: set[str] = set()
    for value in headers.getall("Connection", ()):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return frozenset(names)


ERROR_BODY_LIMIT = 64 * 1024


def json_error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


TENANT = web.RequestKey("olmd_tenant", str)  # the tenant the guard found
# Set by the guard on a keyless GET /api/version while keys are required: it answers
# the version only (clients check it before they send a key).
ANONYMOUS = web.RequestKey("olmd_anonymous", bool)


def openai_error(status: int, message: str, **headers: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return web.json_response(body, status=status, headers=headers)


def response_headers(
    upstream: aiohttp.ClientResponse, node: str, route: str | None = None
) -> CIMultiDict[str]:
    skip = SKIP_RESPONSE
    if "Connection" in upstream.headers:
        skip = skip | _named_by_connection(upstream.headers)
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in upstream.headers.items() if k.lower() not in skip
    )
    headers["X-Olmd-Node"] = node
    if route is not None:
        headers["X-Olmd-Route"] = route
    return headers


def forward_headers(request: web.Request) -> dict[str, str]:
    # A plain dict: aiohttp builds its own multidict from it anyway. A repeated header
    # keeps its last value, which is what Ollama's HTTP server reads too.
    skip = SKIP_REQUEST
    if "Connection" in request.headers:
        skip = skip | _named_by_connection(request.headers)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in skip}
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    return headers


def error_message(text: str) -> str | None:
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500] or None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, str):
            return err
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])
    return None


def _count_after(data: bytes, field: bytes) -> int | None:
    at = data.rfind(field)
    if at < 0:
        return None
    start = end = at + len(field)
    while end < len(data) and 48 <= data[end] <= 57:  # ASCII digits
        end += 1
    return int(data[start:end]) if end > start else None


def usage_from_tail(tail: bytes) -> tuple[int, int, int] | None:
    """(prompt tokens, generated tokens, eval nanoseconds) from a response's last bytes.

    Ollama puts the counts in its final chunk (``done: true``); the OpenAI-compatible
    routes put ``usage`` in the last object before ``[DONE]``; Anthropic's Messages and
    the Responses API put ``input_tokens`` and ``output_tokens`` in the final event
    (``message_delta``, ``response.completed``) or the whole answer. Found by searching, not by
    parsing: Ollama's final generate chunk also carries ``context``, thousands of token
    ids long. Only these keys' exact spelling matches (``"eval_count":`` cannot match
    inside ``"prompt_eval_count":``, nor inside an escaped string).
    """
    generated = _count_after(tail, b'"eval_count":')
    if generated is not None:
        prompt = _count_after(tail, b'"prompt_eval_count":') or 0
        return prompt, generated, _count_after(tail, b'"eval_duration":') or 0
    completion = _count_after(tail, b'"completion_tokens":')
    if completion is not None:
        return _count_after(tail, b'"prompt_tokens":') or 0, completion, 0
    output = _count_after(tail, b'"output_tokens":')  # Anthropic's and the Responses API's
    if output is not None:
        return _count_after(tail, b'"input_tokens":') or 0, output, 0
    return None


def timings_from_tail(tail: bytes) -> Sample | None:
    """Ollama's timings from a response's final chunk, found as ``usage_from_tail`` finds
    the counts. None for answers without them (the OpenAI-compatible routes)."""
    generated = _count_after(tail, b'"eval_count":')
    if generated is None:
        return None
    return Sample(
        load_ns=_count_after(tail, b'"load_duration":') or 0,
        prompt_count=_count_after(tail, b'"prompt_eval_count":') or 0,
        prompt_ns=_count_after(tail, b'"prompt_eval_duration":') or 0,
        eval_count=generated,
        eval_ns=_count_after(tail, b'"eval_duration":') or 0,
        total_ns=_count_after(tail, b'"total_duration":') or 0,
    )
