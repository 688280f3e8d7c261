"""How the emulator answers: JSON and error bodies, streamed sinks, faults, the middleware.

The middleware counts API requests, applies the injected fault a request draws and turns
exceptions (:class:`~daemon.emulator.formats.Reject`, a departed client, a fault that ended
the answer) into what Ollama would send. :class:`Sink` writes a streamed answer, chunk by
chunk, and :func:`single` a one-object answer; both honour a ``cut`` or ``error_line`` fault.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.emulator import anthropic as anthropic_api
from daemon.emulator import formats as fmt
from daemon.emulator.formats import Reject
from daemon.emulator.state import STATE_KEY, ClientGone, hold

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Aborted(Exception):
    """An injected fault ended the answer; ``response`` is what aiohttp should finish."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("fault injected")
        self.response = response


_FAULT = web.RequestKey("olmd_emulator_fault", tuple)


# ---------------------------------------------------------------- responses


def json_response(body: Any, status: int = 200, *, openai: bool = False) -> web.Response:
    # Gin's c.JSON adds a charset; Ollama's /v1 middleware sets plain application/json.
    charset = None if openai else "utf-8"
    return web.Response(
        body=fmt.dumps(body), status=status, content_type="application/json", charset=charset
    )


def error_response(
    status: int, message: str, *, openai: bool, anthropic: bool = False
) -> web.Response:
    """Ollama's error body, OpenAI's, or (``/v1/messages``) Anthropic's."""
    if anthropic:
        return json_response(anthropic_api.error(status, message), status, openai=True)
    body = fmt.openai_error(status, message) if openai else {"error": message}
    return json_response(body, status, openai=openai)


def _is_anthropic(request: web.BaseRequest) -> bool:
    return request.path == "/v1/messages"


def _abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


class Sink:
    """A streamed answer. Headers leave with the first chunk, as from Go's writer, so a
    failure before it (queue full, client gone during the cold load) still sets the status."""

    __slots__ = ("_after", "_error", "_fault", "_openai", "_request", "_sent", "response")

    def __init__(self, request: web.Request, content_type: str, *, error: str, openai: bool):
        kind, self._after = request.get(_FAULT, ("none", 0))
        self._fault = kind if kind in ("cut", "error_line") else None
        self._request = request
        self._error = error
        self._openai = openai
        self._sent = -1  # not prepared yet
        self.response = web.StreamResponse()
        self.response.content_type = content_type

    async def send(self, data: bytes, *, last: bool = False) -> None:
        if self._sent < 0:
            await self.response.prepare(self._request)
            self._sent = 0
        # A fault set past the end fires before the last chunk: never a clean ending.
        if self._fault is not None and (self._sent >= self._after or last):
            if self._fault == "cut":
                _abort(self._request)
            elif _is_anthropic(self._request):
                error = anthropic_api.error(500, self._error)
                await self.response.write(b"event: error\ndata: " + fmt.dumps(error) + b"\n\n")
            elif self._openai:
                await self.response.write(fmt.sse(fmt.openai_error(500, self._error)))
            else:
                await self.response.write(fmt.ndjson({"error": self._error}))
            raise _Aborted(self.response)
        await self.response.write(data)
        self._sent += 1


async def single(
    request: web.Request, body: dict[str, Any], *, openai: bool, error: str = fmt.ERR_RUNNER_GONE
) -> web.StreamResponse:
    """A one-object answer that completes the request; under a fault cut sends half the
    body and error_line Ollama's 500."""
    kind, _ = request.get(_FAULT, ("none", 0))
    if kind == "error_line":
        return error_response(500, error, openai=openai, anthropic=_is_anthropic(request))
    response = json_response(body, openai=openai)
    if kind == "cut":
        data = fmt.dumps(body)
        partial = web.StreamResponse(headers={"Content-Type": response.headers["Content-Type"]})
        partial.content_length = len(data)
        await partial.prepare(request)
        await partial.write(data[: len(data) // 2])
        _abort(request)
        raise _Aborted(partial)
    request.app[STATE_KEY].stats.completed += 1
    return response


async def read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        raise Reject(400, fmt.ERR_MISSING_BODY)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise Reject(400, f"invalid request body: {exc}") from None
    if not isinstance(body, dict):
        raise Reject(400, "invalid request body: expected a JSON object")
    return body


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts API requests, applies faults, turns exceptions into Ollama's answers."""
    state = request.app[STATE_KEY]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else ""
    if not route.startswith(("/api/", "/v1/")):
        return await handler(request)
    state.stats.requests[route] = state.stats.requests.get(route, 0) + 1
    openai = route.startswith("/v1/")
    anthropic = route == "/v1/messages"
    request[_FAULT] = state.take_fault(route)
    fault = request[_FAULT][0]
    try:
        if fault == "http500":
            return error_response(500, fmt.ERR_RUNNER_GONE, openai=openai, anthropic=anthropic)
        if fault == "http503":
            return error_response(503, fmt.ERR_MAX_QUEUE, openai=openai, anthropic=anthropic)
        if fault == "refuse":
            _abort(request)
            return web.Response()  # never sent: aiohttp finds the transport closed
        while fault == "stall":  # until the client gives up (ClientGone)
            await hold(request, 3600.0)
        return await handler(request)
    except Reject as exc:
        return error_response(exc.status, exc.message, openai=openai, anthropic=anthropic)
    except _Aborted as exc:
        return exc.response
    except (ClientGone, ConnectionResetError):
        state.stats.cancelled += 1
        return web.Response()  # never sent, as above
    except asyncio.CancelledError:
        if not state.stopping:
            state.stats.cancelled += 1
        raise
