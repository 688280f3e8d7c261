"""``/admin/*``: node state, drain and undrain, model sync, tenants' usage. Behind the
admin token (see guard.py; with no token set, the read-only views answer on loopback, as
the status page does); answers never include secrets."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from daemon.gateway.component import GATEWAY, Gateway
from daemon.gateway.guard import is_admin, reads_allowed
from daemon.gateway.tenants import TENANCY
from daemon.logs import get_logger
from daemon.sync.service import SYNC, SyncOptions

log = get_logger("olmd.admin")


def _gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY]


def nodes_view(app: web.Application) -> dict[str, Any]:
    """The fleet as ``GET /admin/nodes`` shows it (the status page shows the same)."""
    gateway = app[GATEWAY]
    now = time.monotonic()
    nodes = [
        gateway.fleet.describe(node, now) | gateway.router.describe(node) for node in gateway.fleet
    ]
    return {
        "nodes": nodes,
        "panic": gateway.fleet.panic,
        "queued": gateway.router.queued,
        "strategy": gateway.router.routing.strategy,
    }


def sync_view(app: web.Application) -> dict[str, Any] | None:
    """``GET /admin/sync``'s answer; None where the daemon runs no sync service. With
    the cluster on it is the fleet's sync (the same on every gateway), with ``cluster``
    and ``blocked`` saying who holds the lease and why no sync can start."""
    return app[SYNC].status() if SYNC in app else None


async def list_nodes(request: web.Request) -> web.Response:
    return web.json_response(nodes_view(request.app))


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


async def start_sync(request: web.Request) -> web.Response:
    """Start a sync with the CLI's options as JSON (``{"skip_existing": true, ...}``)."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else {}
        options = SyncOptions.model_validate(body)
        started = await request.app[SYNC].start(options, trigger="api")
    except (ValueError, ValidationError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    if not started:
        # 409: another run holds the lock or the lease; 503: the cluster's Redis does
        # not answer, so no sync can start anywhere until it does.
        refusal = request.app[SYNC].refusal or {}
        reason = refusal.get("reason") or "a sync is already running"
        return web.json_response({"error": reason}, status=503 if refusal.get("blocked") else 409)
    log.info("sync_started_by_api", options=options.model_dump(mode="json"))
    return web.json_response(request.app[SYNC].status(), status=202)


async def sync_status(request: web.Request) -> web.Response:
    view = sync_view(request.app)
    if view is None:
        return web.json_response({"error": "this daemon runs no model sync"}, status=404)
    return web.json_response(view)


_SINCE_DAYS = re.compile(r"^([1-9][0-9]{0,3})d$")


def since_date(value: str, today: dt.date) -> str:
    """``"7d"`` (the last seven days, today included) or a date ``"2026-12-01"``."""
    match = _SINCE_DAYS.match(value)
    if match:
        return (today - dt.timedelta(days=int(match[1]) - 1)).isoformat()
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(f"since: {value!r} is neither a number of days (7d) nor a date") from None


def usage_view(
    app: web.Application, since: str, tenant: str | None, days: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Tenants' usage; ``days`` from ``Tenancy.shared_days`` for a cluster's."""
    tenancy = app[TENANCY]
    view = tenancy.view(since, tenant, dict(app[GATEWAY].router.queue.queued_by), days)
    view["enabled"] = tenancy.enabled
    return view


async def usage(request: web.Request) -> web.Response:
    """Each tenant's settings, state now and usage since ``since`` (default: today)."""
    today = dt.datetime.now(dt.UTC).date()
    try:
        since = since_date(request.query.get("since", "1d"), today)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    tenant = request.query.get("tenant") or None
    if TENANCY not in request.app:
        return web.json_response({"error": "tenancy is not running"}, status=503)
    days = await request.app[TENANCY].shared_days(since)
    return web.json_response(usage_view(request.app, since, tenant, days))


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _admin_only(handler: Handler) -> Handler:
    # The front door refuses first; this holds even if a route slipped past its rules.
    async def checked(request: web.Request) -> web.Response:
        if not is_admin(request):
            return web.json_response({"error": "this route needs the admin token"}, status=403)
        return await handler(request)

    return checked


def _reader(handler: Handler) -> Handler:
    """A read-only view: the admin token, or loopback while no token is set."""

    async def checked(request: web.Request) -> web.Response:
        if not reads_allowed(request):
            return web.json_response({"error": "this route needs the admin token"}, status=403)
        return await handler(request)

    return checked


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/nodes", _reader(list_nodes))
    app.router.add_post("/admin/nodes/{name}/drain", _admin_only(drain))
    app.router.add_post("/admin/nodes/{name}/undrain", _admin_only(undrain))
    app.router.add_post("/admin/sync", _admin_only(start_sync))
    app.router.add_get("/admin/sync", _reader(sync_status))
    app.router.add_get("/admin/usage", _reader(usage))
