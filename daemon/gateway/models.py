"""Model management for the whole fleet: ``/api/pull``, ``/api/delete``, ``/api/copy``.

With the admin token (the guard checked it) and no ``X-Olmd-Node``, a request goes to
every node that is up, or to the nodes ``X-Olmd-Nodes`` names (comma-separated): so an
Ollama client's model manager (Open WebUI's) manages the fleet through olmd. A pull
streams Ollama's progress format merged across the nodes; in gateway mode the model comes
into olmd's cache first (once), and the nodes pull it from olmd. ``X-Olmd-Node`` keeps the
single-node behaviour: the request passes through to that node as it is.
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from daemon.distribution.client import RegistryError
from daemon.distribution.component import DISTRIBUTION
from daemon.distribution.fanout import Mirror, NodeRef, fleet_copy, fleet_delete, fleet_pull
from daemon.distribution.mirror import mirror_name
from daemon.domain import ModelRef, NodeState
from daemon.gateway.component import GATEWAY
from daemon.gateway.wire import json_error
from daemon.logs import get_logger
from daemon.runtime import RUNTIME

__all__ = ["copy", "delete", "pull"]

log = get_logger("olmd.models")


def _targets(request: web.Request) -> list[NodeRef] | web.Response:
    fleet = request.app[GATEWAY].fleet
    named = request.headers.get("X-Olmd-Nodes", "")
    if named.strip():
        out = []
        for name in (n.strip() for n in named.split(",") if n.strip()):
            node = fleet.get(name)
            if node is None:
                return json_error(400, f"X-Olmd-Nodes: no node named {name!r}")
            out.append(NodeRef(node.name, node.url, node.redact))
        return out
    now = time.monotonic()
    up = [NodeRef(n.name, n.url, n.redact) for n in fleet if n.state(now) is not NodeState.DOWN]
    if not up:
        return json_error(503, "no node is up")
    return up


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError as exc:
        return json_error(400, f"invalid request body: {exc}")
    if not isinstance(body, dict):
        return json_error(400, "invalid request body: expected a JSON object")
    return body


def _model(body: dict[str, Any], *keys: str) -> str | web.Response:
    for key in keys:
        value = body.get(key)
        if isinstance(value, str) and value.strip():
            try:
                return ModelRef.parse(value.strip()).name
            except ValueError as exc:
                return json_error(400, str(exc))
    return json_error(400, f"{keys[0]} is required")


async def _model_and_nodes(
    request: web.Request,
) -> tuple[dict[str, Any], str, list[NodeRef]] | web.Response:
    """A pull's or delete's body, the model it names and the nodes it goes to, or the
    answer saying why not."""
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    model = _model(body, "model", "name")
    if isinstance(model, web.Response):
        return model
    nodes = _targets(request)
    if isinstance(nodes, web.Response):
        return nodes
    return body, model, nodes


async def pull(request: web.Request) -> web.StreamResponse:
    asked = await _model_and_nodes(request)
    if isinstance(asked, web.Response):
        return asked
    body, model, nodes = asked
    runtime, gateway = request.app[RUNTIME], request.app[GATEWAY]
    settings = runtime.settings
    log.info("models.fleet_pull", model=model, nodes=[n.name for n in nodes])
    stream = body.get("stream") is not False
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    last: dict[str, Any] = {}

    async def emit(line: dict[str, Any]) -> None:
        nonlocal last
        last = line
        if stream:
            if not response.prepared:
                await response.prepare(request)
            await response.write(json.dumps(line).encode() + b"\n")

    mirror = None
    dist = request.app.get(DISTRIBUTION)
    if settings.distribution.mode == "gateway" and dist is not None:
        ref = ModelRef.parse(model)
        await emit({"status": "pulling manifest"})
        try:
            cached = await dist.ensure(model)
        except RegistryError as exc:
            await emit({"error": f"olmd could not cache {model}: {exc}"})
            return await _finish(request, response, stream, last)
        source = mirror_name(settings, model)
        url = f"{settings.advertise_url()}/v2/{ref.namespace}/{ref.model}/manifests/{ref.tag}"
        mirror = Mirror(source, url)
        await emit({"status": f"cached in olmd ({cached.digest})"})
    async for line in fleet_pull(
        gateway.session, nodes, model, mirror=mirror,
        connect_timeout=settings.routing.connect_timeout,
    ):  # fmt: skip
        await emit(line)
    return await _finish(request, response, stream, last)


async def _finish(
    request: web.Request, response: web.StreamResponse, stream: bool, last: dict[str, Any]
) -> web.StreamResponse:
    if stream:
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        return response
    if "error" in last:
        return json_error(500, str(last["error"]))
    return web.json_response(last)


def _failures(what: str, failed: dict[str, Any], total: int) -> web.Response | None:
    if not failed:
        return None
    statuses = {getattr(e, "status", 0) for e in failed.values()}
    detail = "; ".join(f"{n}: {e}" for n, e in sorted(failed.items()))
    status = 404 if statuses == {404} and len(failed) == total else 500
    return json_error(status, f"{what} failed on {len(failed)} of {total} nodes: {detail}")


async def delete(request: web.Request) -> web.StreamResponse:
    asked = await _model_and_nodes(request)
    if isinstance(asked, web.Response):
        return asked
    _, model, nodes = asked
    log.info("models.fleet_delete", model=model, nodes=[n.name for n in nodes])
    failed = await fleet_delete(request.app[GATEWAY].session, nodes, model)
    return _failures(f"delete of {model}", failed, len(nodes)) or web.Response()


async def copy(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if isinstance(body, web.Response):
        return body
    source = _model(body, "source")
    destination = _model(body, "destination")
    if isinstance(source, web.Response):
        return source
    if isinstance(destination, web.Response):
        return destination
    nodes = _targets(request)
    if isinstance(nodes, web.Response):
        return nodes
    log.info("models.fleet_copy", source=source, destination=destination)
    failed = await fleet_copy(request.app[GATEWAY].session, nodes, source, destination)
    return _failures(f"copy of {source}", failed, len(nodes)) or web.Response()
