"""The aiohttp application: middlewares, routes, and the components' cleanup contexts.

Components start in dependency order and stop in reverse (``cleanup_ctx`` unwinds only
what started); they join SIGHUP through ``Runtime.on_reload``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from daemon import guard, routes
from daemon.gateway import gateway_component
from daemon.metrics import CONTENT_TYPE, Metrics
from daemon.runtime import RUNTIME, Phase, Runtime
from daemon.settings import Settings
from daemon.sync import sync_component

# Routes that do not count as traffic for draining.
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def _track_in_flight(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path in _PROBE_PATHS:
        return await handler(request)
    runtime = request.app[RUNTIME]
    runtime.in_flight += 1
    try:
        return await handler(request)
    except BaseException:
        if runtime.phase is Phase.DRAINING:
            runtime.cancelled_on_drain += 1
        raise
    finally:
        runtime.in_flight -= 1


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    status = 200 if runtime.phase is Phase.READY else 503
    return web.json_response({"status": str(runtime.phase)}, status=status)


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


Component = Callable[[web.Application], AsyncIterator[None]]
DEFAULT_COMPONENTS: tuple[Component, ...] = (gateway_component, sync_component)


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    components: list[Component] | None = None,
) -> web.Application:
    """The daemon's application. ``components`` run as cleanup contexts, in order."""
    app = web.Application(
        middlewares=[guard.json_errors, _track_in_flight, guard.guard],
        client_max_size=settings.server.max_body_bytes,
    )
    app[RUNTIME] = Runtime(settings=settings, metrics=metrics or Metrics())
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    routes.add_routes(app)
    app.cleanup_ctx.extend(DEFAULT_COMPONENTS if components is None else components)
    return app
