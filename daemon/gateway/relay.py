"""Copying a streamed answer from its node to the client, chunk by chunk, untouched.

Nothing per chunk but a write and two timestamps (the :class:`StreamGuard` watches for a
node gone quiet and a client that stopped reading). A stream the node cuts ends with one
error line in the stream's own format (``dialects.cut_line``); a client that leaves
closes the node's request, so no GPU slot is held for nobody.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from daemon.domain import FailureKind
from daemon.gateway.dialects import cut_line, final_error
from daemon.gateway.endpoint import Endpoint
from daemon.gateway.fleet import Fleet, Node
from daemon.gateway.outcome import Outcomes
from daemon.gateway.routing.router import Route
from daemon.gateway.stream_guard import StreamGuard
from daemon.gateway.wire import response_headers
from daemon.settings import RoutingSettings

# Recorded for a client that left before its answer ended (nginx's convention).
CLIENT_GONE = 499


class Relay:
    def __init__(self, fleet: Fleet, outcomes: Outcomes) -> None:
        self.fleet = fleet
        self.outcomes = outcomes

    async def __call__(
        self,
        request: web.Request,
        route: Route,
        endpoint: Endpoint,
        upstream: aiohttp.ClientResponse,
        first: bytes,
        started: float,
        routing: RoutingSettings,
    ) -> web.StreamResponse:
        """Stream ``upstream`` (``first`` already read) to the client; the response."""
        node, key = route.node, route.key
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream, node.name, route.reason),
        )
        if route.ticket is not None and route.ticket.headers:
            response.headers.update(route.ticket.headers)
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        loop = asyncio.get_running_loop()
        status = upstream.status
        prev, tail = b"", first
        guard: StreamGuard | None = None
        try:
            await response.prepare(request)
            if first:
                await response.write(first)
            async with asyncio.timeout(None) as deadline:
                guard = StreamGuard(loop, deadline, routing.idle_timeout, routing.write_timeout)
                try:
                    async for chunk in upstream.content.iter_any():
                        prev, tail = tail, chunk
                        guard.writing = loop.time()  # a slow client is not an idle node
                        await response.write(chunk)
                        guard.writing = None
                        guard.last = loop.time()
                finally:
                    guard.cancel()
            self.fleet.request_ok(node, time.monotonic(), key)
            await response.write_eof()
        except ConnectionResetError:
            # Raised by our writes (aiohttp's ClientConnectionResetError): the client left.
            self.outcomes.count(node, key, endpoint.path, CLIENT_GONE)
            return self._client_gone(node, upstream, response)
        except (TimeoutError, aiohttp.ClientError) as exc:
            if guard is not None and guard.stuck:
                # The client stopped reading (its window full) and did not close: cut it,
                # and the node's request with it, so it holds no GPU slot.
                self.outcomes.count(node, key, endpoint.path, CLIENT_GONE)
                self._client_gone(node, upstream, response)
                if request.transport is not None:
                    request.transport.abort()
                return response
            upstream.close()
            if not isinstance(exc, TimeoutError):
                detail = "stream cut"
                self.fleet.request_failed(node, time.monotonic(), FailureKind.CONNECT, detail)
            elif guard is not None and guard.idle:
                detail = "idle timeout"
                self.fleet.request_failed(node, time.monotonic(), FailureKind.TIMEOUT, detail)
            else:  # total_timeout: the answer took too long, the node did nothing wrong
                detail = "total timeout"
            self.outcomes.child(self.outcomes.metrics.stream_errors, node.name).inc()
            line = cut_line(endpoint.dialect, sse, endpoint.events, f"node {node.name}: {detail}")
            await final_error(response, line)
            status = 599  # recorded as a failed stream in metrics
        except asyncio.CancelledError:
            self.outcomes.count(node, key, endpoint.path, CLIENT_GONE)
            self._client_gone(node, upstream, response)
            raise
        finally:
            upstream.release()
        self.outcomes.observe(route, endpoint.path, status, started, prev + tail)
        return response

    def _client_gone(
        self, node: Node, upstream: aiohttp.ClientResponse, response: web.StreamResponse
    ) -> web.StreamResponse:
        # Closing the node's connection is what stops the GPU generating.
        upstream.close()
        self.outcomes.child(self.outcomes.metrics.upstream_cancelled, node.name).inc()
        return response
