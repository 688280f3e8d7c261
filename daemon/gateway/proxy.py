"""Forwarding LLM requests to a node and streaming the answer back untouched.

Per request: read the body once, take its ``model`` (``body``), ask the router for a
node, forward over the shared connection pool (the model in the node's own spelling),
copy bytes through as they arrive (``relay``). Before the first byte reaches the client
a failure moves the request to another node; after it, a cut ends the stream with one
error line in the stream's own format. Nothing per chunk but a write and a timestamp;
only the final chunk is parsed, for token metrics (``outcome``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from daemon.domain import FailureKind, classify_status
from daemon.gateway.body import BadBody, Body, read_body
from daemon.gateway.dialects import error_for, model_not_found, rate_limited
from daemon.gateway.endpoint import Endpoint
from daemon.gateway.fleet import Fleet, Node, model_key
from daemon.gateway.outcome import Outcomes
from daemon.gateway.relay import CLIENT_GONE, Relay
from daemon.gateway.routing.prompts import Prompt, route_facts
from daemon.gateway.routing.router import NoNode, Route, Router
from daemon.gateway.wire import (
    ERROR_BODY_LIMIT,
    TENANT,
    error_message,
    forward_headers,
    response_headers,
)
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.ports import RouteRequest
from daemon.settings import DEFAULT_TENANT, RoutingSettings
from daemon.tenancy.fair import DEFAULT_SHARE
from daemon.tenancy.limits import Refusal
from daemon.tenancy.tenancy import Tenancy, Ticket

log = get_logger("olmd.proxy")

_NO_CONTENT_TYPE = ("Content-Type",)
# A connection that died under a request before its first byte (refused ones are caught
# before these: ClientConnectorError is a ClientOSError too).
_DIED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)
_SAME_MOMENT = 1.0  # seconds: deaths this close on one node are one node dying


class _Retry(Exception):
    """An attempt failed before the first byte reached the client; try another node.

    ``free``: the request never reached the node (the connection was refused), so trying
    it elsewhere adds no GPU work and does not count against the retry budget.
    """

    def __init__(
        self, reason: str, response: web.Response, *, free: bool = False, death: bool = False
    ) -> None:
        self.reason = reason
        self.response = response  # what the client gets if no attempt is left
        self.free = free
        self.death = death  # the connection died under the request (a node killed?)


class Proxy:
    def __init__(
        self,
        fleet: Fleet,
        router: Router,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        routing: RoutingSettings,
    ) -> None:
        self.fleet = fleet
        self.router = router
        self.session = session
        self.metrics = metrics
        self.active = 0
        self.retrying = 0
        self.tenancy: Tenancy | None = None  # set while tenants, keys or a header are on
        self.outcomes = Outcomes(metrics, router)
        self.relay = Relay(fleet, self.outcomes)
        self.configure(routing)

    def configure(self, routing: RoutingSettings) -> None:
        self.routing = routing
        self.timeout = aiohttp.ClientTimeout(
            total=routing.total_timeout or None, sock_connect=routing.connect_timeout
        )

    def _child(self, metric: Any, *labels: str) -> Any:
        return self.outcomes.child(metric, *labels)

    def _retry_allowed(self) -> bool:
        # Envoy-style retry budget: retries in flight stay under a share of requests in
        # flight, so a fleet-wide outage does not multiply the load by max_attempts.
        budget = max(3, self.active * self.routing.retry_budget_percent // 100)
        return self.retrying < budget

    async def forward(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        started = time.monotonic()
        dialect = endpoint.dialect
        error = error_for(dialect)
        try:
            body = await read_body(request, form=endpoint.form)
            key = model_key(body.name)
        except (BadBody, ValueError) as exc:
            return error(400, str(exc))
        payload = body.payload
        upstream = endpoint.upstream
        if upstream == "embeddings":  # the wrapper route takes either body form
            upstream = "/api/embed" if "input" in payload else "/api/embeddings"
        # Ollama's routes stream unless told not to; OpenAI's and Anthropic's only if asked.
        if not endpoint.streams:
            streaming = False
        elif dialect == "ollama":
            streaming = payload.get("stream", True) is not False
        else:
            streaming = payload.get("stream") is True
        # A non-streamed answer arrives whole after the generation: its first byte may
        # legitimately come long after a streamed one's would.
        wait = self.routing.first_byte_timeout
        if not streaming:
            wait = max(wait, self.routing.non_streaming_timeout)
        headers = forward_headers(request)
        route_request, prompt = route_facts(
            request, dialect == "openai", upstream, payload, key, with_prompt=self.router.cost_aware
        )
        tenancy = self.tenancy
        if tenancy is None:
            return await self._route(
                request, endpoint, upstream, body, headers, route_request, prompt, started, wait
            )
        tenant = request.get(TENANT, DEFAULT_TENANT)
        if not tenancy.allows(tenant, key):
            # As a model no node has: the tenant learns nothing of what others may use.
            tenancy.refused(tenant, key)
            answer = model_not_found(dialect, body.name)
            answer.headers.update(tenancy.headers(tenant))
            return answer
        estimate = route_request.prompt_tokens or (0 if body.is_form else len(body.raw) // 4)
        admitted = await tenancy.admit(tenant, key, estimate)
        if isinstance(admitted, Refusal):
            self.metrics.rejected.labels(endpoint.path, "429").inc()
            return rate_limited(admitted, dialect, tenancy.headers(tenant))
        status = CLIENT_GONE
        try:
            response = await self._route(
                request,
                endpoint,
                upstream,
                body,
                headers,
                route_request,
                prompt,
                started,
                wait,
                admitted,
            )
            status = response.status
            if admitted.headers and not response.prepared:
                response.headers.update(admitted.headers)
            return response
        finally:
            tenancy.finish(admitted, status)

    async def _route(
        self,
        request: web.Request,
        endpoint: Endpoint,
        upstream: str,
        body: Body,
        headers: Mapping[str, str],
        route_request: RouteRequest,
        prompt: Prompt,
        started: float,
        wait: float,
        ticket: Ticket | None = None,
    ) -> web.StreamResponse:
        """Route and forward, failing over before the first byte; the answer."""
        error = error_for(endpoint.dialect)
        key = route_request.model
        share = ticket.share if ticket is not None else DEFAULT_SHARE
        tried: list[str] = []
        last: web.Response | None = None
        node: Node | None = None
        free = False  # the last attempt's failure cost no GPU work
        deaths = 0  # attempts whose connection died under them
        self.active += 1
        try:
            while True:
                try:
                    asked = time.monotonic()
                    route = await self.router.acquire(route_request, prompt, tried, share)
                    if ticket is not None:
                        ticket.queue_wait += time.monotonic() - asked
                        route.ticket = ticket
                except NoNode as exc:
                    if last is not None and node is not None and exc.status == 404:
                        self._count(node, key, endpoint, last.status)
                        return last  # every node holding the model was tried
                    self.metrics.rejected.labels(endpoint.path, str(exc.status)).inc()
                    if exc.status == 404:  # no node holds it: as Ollama says so
                        return model_not_found(endpoint.dialect, body.name)
                    extra = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else {}
                    if exc.status == 429 and ticket is not None:  # the tenant's queue_limit
                        self.metrics.tenant_rate_limited.labels(ticket.tenant, "queue").inc()
                        refusal = Refusal("queue", exc.message, exc.retry_after or 1)
                        return rate_limited(refusal, endpoint.dialect, ticket.headers)
                    return error(exc.status, exc.message, **extra)
                node = route.node
                tried.append(node.name)
                retry = len(tried) > 1
                budgeted = retry and not free
                if retry:
                    route.reason = "failover"
                if budgeted:
                    self.retrying += 1
                self._child(self.metrics.route_decisions, self.routing.strategy, route.reason).inc()
                try:
                    return await self._attempt(
                        request, route, endpoint, upstream, body, headers, started, wait
                    )
                except _Final as final:
                    self.router.abandon(route)  # an error answer: nothing was evaluated
                    self._count(node, key, endpoint, final.response.status)
                    return final.response
                except _Retry as failed:
                    self.router.abandon(route)
                    last = failed.response
                    free = failed.free
                    deaths += failed.death
                    # A request whose nodes died under it twice may be what kills them:
                    # it gets the error rather than a third node.
                    out_of_attempts = len(tried) >= self.routing.max_attempts or deaths >= 2
                    if out_of_attempts or (not free and not self._retry_allowed()):
                        self._count(node, key, endpoint, failed.response.status)
                        return failed.response
                    self.metrics.failovers.labels(endpoint.path, failed.reason).inc()
                    log.info(
                        "failover",
                        node=node.name,
                        reason=failed.reason,
                        model=key,
                        endpoint=endpoint.path,
                        attempt=len(tried),
                    )
                finally:
                    self.router.release(route)
                    if budgeted:
                        self.retrying -= 1
        finally:
            self.active -= 1

    async def _attempt(
        self,
        request: web.Request,
        route: Route,
        endpoint: Endpoint,
        upstream_path: str,
        body: Body,
        headers: Mapping[str, str],
        started: float,
        wait: float,
    ) -> web.StreamResponse:
        node, key = route.node, route.key
        error = error_for(endpoint.dialect)
        node_header = {"X-Olmd-Node": node.name, "X-Olmd-Route": route.reason}
        listed = node.listed(key)
        # No Content-Type from the client, none to the node (aiohttp would add its own).
        skip = () if "Content-Type" in headers else _NO_CONTENT_TYPE
        try:
            async with asyncio.timeout(wait):
                upstream = await self.session.post(
                    node.url + upstream_path,
                    data=body.for_node(listed),
                    headers=headers,
                    timeout=self.timeout,
                    skip_auto_headers=skip,
                )
                try:
                    if upstream.status >= 400:
                        # The node was sent its own spelling: its 404 is about that model.
                        exact = listed is not None
                        await self._refused(node, upstream, key, exact, error, node_header)
                    first = await upstream.content.readany()
                except BaseException:
                    upstream.close()
                    raise
        except aiohttp.ConnectionTimeoutError:
            # No connection in connect_timeout: the request never reached the node.
            self._failed(node, FailureKind.CONNECT, "no connection in time")
            raise _Retry(
                "connect", error(502, f"node {node.name} unreachable", **node_header), free=True
            ) from None
        except TimeoutError:
            self._failed(node, FailureKind.TIMEOUT, "no first byte in time")
            raise _Retry(
                "timeout", error(504, f"node {node.name} sent nothing in time", **node_header)
            ) from None
        except aiohttp.ClientConnectorError as exc:
            # Nothing listens there (a node that died or restarts): the request went
            # nowhere, so another node gets it whatever the retry budget says.
            self._failed(node, FailureKind.REFUSED, str(exc) or type(exc).__name__)
            raise _Retry(
                "refused", error(502, f"node {node.name} unreachable", **node_header), free=True
            ) from None
        except _DIED as exc:
            # The connection died under the request: the node was probably killed or
            # crashed. Evident when it is out already, or when another request to it died
            # the same way a moment ago: then trying elsewhere costs the budget nothing.
            now = time.monotonic()
            evident = not node.health.is_routable(now) or now - node.last_death < _SAME_MOMENT
            node.last_death = now
            self._failed(node, FailureKind.CONNECT, str(exc) or type(exc).__name__)
            raise _Retry(
                "reset",
                error(502, f"node {node.name} closed the connection", **node_header),
                free=evident,
                death=True,
            ) from None
        except aiohttp.ClientError as exc:
            self._failed(node, FailureKind.CONNECT, str(exc) or type(exc).__name__)
            raise _Retry(
                "connect", error(502, f"node {node.name} unreachable", **node_header)
            ) from None
        except asyncio.CancelledError:
            # The client left before the first byte (a cold load, say): the node's
            # request was closed with the cancelled task.
            self._count(node, key, endpoint, CLIENT_GONE)
            self._child(self.metrics.upstream_cancelled, node.name).inc()
            raise
        now = time.monotonic()
        if route.ticket is not None:
            route.ticket.ttft = now - started
        self._child(self.metrics.ttfb, endpoint.path).observe(now - started)
        self._child(self.metrics.ttft_measured, node.name).observe(now - route.started)
        if route.estimate is not None:
            self._child(self.metrics.ttft_estimated, node.name).observe(route.estimate)
        if upstream.content.at_eof():
            # The whole body came with the first read (a non-streamed answer): answer in
            # one write, without the streaming machinery.
            headers = response_headers(upstream, node.name, route.reason)
            upstream.release()
            self.fleet.request_ok(node, time.monotonic(), key)
            self._observe(route, endpoint, upstream.status, started, first)
            return web.Response(
                body=first, status=upstream.status, reason=upstream.reason, headers=headers
            )
        return await self.relay(request, route, endpoint, upstream, first, started, self.routing)

    async def _refused(
        self,
        node: Node,
        upstream: aiohttp.ClientResponse,
        key: str,
        exact: bool,
        error: Any,
        node_header: dict[str, str],
    ) -> None:
        """Decide about an error status before anything reached the client.

        Raises _Retry when another node should be tried, _Final when the answer (a 400, or
        a 404 that is not about the model) is the client's to see. A "not found" for the
        model as the node lists it (``exact``) marks it missing there until the next
        probe; for another spelling it says nothing about the listed model.
        """
        status = upstream.status
        text = (await upstream.content.read(ERROR_BODY_LIMIT)).decode("utf-8", "replace")
        message = error_message(text) or upstream.reason or "error"
        reply = error(status, message, **node_header)
        kind = classify_status(status)
        if status == 404 and "not found" in message:
            if exact:
                self.fleet.model_missing(node, key)
            raise _Retry("model_missing", reply)
        if kind is None:
            raise _Final(reply)
        self.fleet.request_failed(node, time.monotonic(), kind, f"HTTP {status}: {message}", key)
        raise _Retry("busy" if kind is FailureKind.BUSY503 else "http5xx", reply)

    def _count(self, node: Node, key: str, endpoint: Endpoint, status: int) -> None:
        self.outcomes.count(node, key, endpoint.path, status)

    def _failed(self, node: Node, kind: FailureKind, detail: str) -> None:
        self.fleet.request_failed(node, time.monotonic(), kind, detail)

    def _observe(
        self, route: Route, endpoint: Endpoint, status: int, started: float, tail: bytes
    ) -> None:
        self.outcomes.observe(route, endpoint.path, status, started, tail)


class _Final(Exception):
    """An upstream error answer the client should see as it is (no failover)."""

    def __init__(self, response: web.Response) -> None:
        self.response = response
