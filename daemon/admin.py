"""``/admin/*``: node state, drain and undrain (sync adds its own). Behind the admin token
(see guard.py); answers never include secrets."""

from __future__ import annotations

import time

from aiohttp import web

from daemon.gateway import GATEWAY, Gateway
from daemon.logs import get_logger

log = get_logger("olmd.admin")


def _gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


async def list_nodes(request: web.Request) -> web.Response:
    gateway = _gateway(request)
    now = time.monotonic()
    nodes = [gateway.fleet.describe(node, now) for node in gateway.fleet]
    return web.json_response(
        {"nodes": nodes, "panic": gateway.fleet.panic, "queued": gateway.router.queued}
    )


async def _set_draining(request: web.Request, draining: bool) -> web.Response:
    gateway = _gateway(request)
    name = request.match_info["name"]
    node = gateway.fleet.set_draining(name, draining)
    if node is None:
        return web.json_response({"error": f"no node named {name!r}"}, status=404)
    log.info("node_draining" if draining else "node_undrained", node=name)
    return web.json_response(gateway.fleet.describe(node, time.monotonic()))


async def drain(request: web.Request) -> web.Response:
    return await _set_draining(request, True)


async def undrain(request: web.Request) -> web.Response:
    return await _set_draining(request, False)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/nodes", list_nodes)
    app.router.add_post("/admin/nodes/{name}/drain", drain)
    app.router.add_post("/admin/nodes/{name}/undrain", undrain)
