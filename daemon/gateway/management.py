"""Model management routes (``/api/pull``, ``/api/push``, ``/api/create``, ``/api/copy``,
``/api/delete``, ``/api/blobs/*``), with the admin token: forwarded as they are to the
node the operator names in ``X-Olmd-Node``; without it, pull, delete and copy go to the
whole fleet (:mod:`daemon.gateway.models`).
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from daemon.gateway import models
from daemon.gateway.component import GATEWAY
from daemon.gateway.dialects import cut_line, final_error
from daemon.gateway.fleet import Node
from daemon.gateway.guard import is_admin
from daemon.gateway.wire import forward_headers, json_error, response_headers

_FLEET_WIDE = {"/api/pull": models.pull, "/api/delete": models.delete, "/api/copy": models.copy}


async def handler(request: web.Request) -> web.StreamResponse:
    # The guard let only the admin token through.
    if not is_admin(request):  # defence in depth; the guard refuses first
        return json_error(403, "this route needs the admin token")
    gateway = request.app[GATEWAY]
    name = request.headers.get("X-Olmd-Node", "")
    if not name and request.path in _FLEET_WIDE:
        return await _FLEET_WIDE[request.path](request)
    node = gateway.fleet.get(name)
    if node is None:
        return json_error(400, "name the target node in the X-Olmd-Node header")
    proxy = gateway.proxy
    return await pass_through(proxy.session, proxy.timeout, request, node)


async def pass_through(
    session: aiohttp.ClientSession,
    limits: aiohttp.ClientTimeout,
    request: web.Request,
    node: Node,
) -> web.StreamResponse:
    """Forward a request as it is (method, path, query, streamed body) to one node."""
    response: web.StreamResponse | None = None
    try:
        async with session.request(
            request.method,
            node.url + request.path_qs,
            data=request.content if request.body_exists else None,
            headers=forward_headers(request),
            timeout=limits,
            # No Content-Type from the client, none to the node (aiohttp would add one).
            skip_auto_headers=() if "Content-Type" in request.headers else ("Content-Type",),
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=response_headers(upstream, node.name),
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except (aiohttp.ClientError, TimeoutError, ConnectionResetError) as exc:
        detail = node.redact(str(exc) or type(exc).__name__)
        if response is None or not response.prepared:
            return json_error(502, f"node {node.name}: {detail}", **{"X-Olmd-Node": node.name})
        # Headers and part of the body are out: end it the way a cut stream ends (if the
        # client left, final_error finds nobody to tell, and that is fine).
        line = cut_line("ollama", False, False, f"node {node.name}: {detail}")
        await final_error(response, line)
        return response
