"""The aiohttp application: middlewares, routes, and the components' cleanup contexts.

Components start in dependency order and stop in reverse (``cleanup_ctx`` unwinds only
what started); they join SIGHUP through ``Runtime.on_reload``. Which components run is
the caller's choice: ``daemon.service.build_app`` adds the sync service to the gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aiohttp import web

from daemon.gateway import guard, routes
from daemon.gateway.component import GATEWAY, gateway_component
from daemon.gateway.dialects import dialect_of, error_for
from daemon.logs import get_logger
from daemon.metrics import CONTENT_TYPE, Metrics
from daemon.runtime import RUNTIME, Phase, Runtime
from daemon.settings import Settings

log = get_logger("olmd.app")

# Routes that do not count as traffic for draining.
_PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@web.middleware
async def front_door(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every request passes here once: the guard, in-flight counting, JSON errors.

    One middleware rather than three: each costs a coroutine frame per request.
    """
    runtime = request.app[RUNTIME]
    refusal = guard.check(request, runtime)
    if refusal is not None:
        return refusal
    counted = request.path not in _PROBE_PATHS
    if counted:
        runtime.in_flight += 1
    try:
        return await handler(request)
    except web.HTTPException as exc:
        reply = guard.as_dialect(exc, runtime, dialect_of(request.path))
        if reply is None:
            raise
        return reply
    except Exception:
        # A bug must not answer with a bare text page: log it, and answer in the route's
        # own dialect, so clients read an error they understand.
        log.exception("handler_failed", path=request.path)
        message = "internal error in olmd; the log says more"
        return error_for(dialect_of(request.path))(500, message)
    except BaseException:
        if counted and runtime.phase is Phase.DRAINING:
            runtime.cancelled_on_drain += 1
        raise
    finally:
        if counted:
            runtime.in_flight -= 1


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    """200 when olmd can route; else 503 and why (starting, draining, no node answering)."""
    runtime = request.app[RUNTIME]
    if runtime.phase is not Phase.READY:
        return web.json_response(
            {"status": str(runtime.phase), "reason": str(runtime.phase)}, status=503
        )
    gateway = request.app.get(GATEWAY)
    routable = runtime.server.readiness == "routable"
    if routable and gateway is not None and not gateway.fleet.answering():
        return web.json_response({"status": "unready", "reason": "no node answering"}, status=503)
    return web.json_response({"status": str(runtime.phase)})


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[RUNTIME].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


Component = Callable[[web.Application], AsyncIterator[None]]


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    components: Sequence[Component] = (gateway_component,),
) -> web.Application:
    """The daemon's application. ``components`` run as cleanup contexts, in order."""
    app = web.Application(
        middlewares=[front_door],
        client_max_size=settings.server.max_body_bytes,
    )
    app[RUNTIME] = Runtime(settings=settings, metrics=metrics or Metrics())
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    routes.add_routes(app)
    app.cleanup_ctx.extend(components)
    return app
