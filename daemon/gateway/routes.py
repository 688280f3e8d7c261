"""The route table: every path olmd answers, and which handler answers it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.gateway import admin, catalog, models, registry_routes, ui
from daemon.gateway.component import GATEWAY
from daemon.gateway.fleet import model_key
from daemon.gateway.guard import as_openai, is_admin
from daemon.gateway.proxy import Endpoint
from daemon.gateway.tenants import TENANCY
from daemon.gateway.wire import TENANT, json_error, openai_error
from daemon.runtime import RUNTIME
from daemon.settings import DEFAULT_TENANT

ENDPOINTS = (
    Endpoint("/api/generate", "/api/generate", streams=True),
    Endpoint("/api/chat", "/api/chat", streams=True),
    Endpoint("/api/embed", "/api/embed"),
    Endpoint("/api/embeddings", "/api/embeddings"),
    Endpoint("/api/show", "/api/show"),
    Endpoint("/v1/chat/completions", "/v1/chat/completions", openai=True, streams=True),
    Endpoint("/v1/completions", "/v1/completions", openai=True, streams=True),
    Endpoint("/v1/embeddings", "/v1/embeddings", openai=True),
    # The deployment guide's wrapper routes: same bodies and answers as the native ones.
    Endpoint("/api/v1/llm/generate", "/api/generate", streams=True),
    Endpoint("/api/v1/llm/chat", "/api/chat", streams=True),
    Endpoint("/api/v1/llm/embeddings", "embeddings"),  # /api/embed or /api/embeddings by body
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _forwarder(endpoint: Endpoint) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].proxy.forward(request, endpoint)

    if not endpoint.openai:
        return handler

    async def openai_handler(request: web.Request) -> web.StreamResponse:
        # aiohttp's own errors (413 from reading the body) in OpenAI's shape; a try costs
        # nothing until something raises.
        try:
            return await request.app[GATEWAY].proxy.forward(request, endpoint)
        except web.HTTPException as exc:
            reply = as_openai(exc, request.app[RUNTIME])
            if reply is None:
                raise
            return reply

    return openai_handler


def _allowed(request: web.Request) -> Callable[[str], bool] | None:
    """The tenant's model filter, or None when it may see every model."""
    tenancy = request.app.get(TENANCY)
    if tenancy is None or not tenancy.enabled:
        return None
    tenant = request.get(TENANT, DEFAULT_TENANT)
    if tenancy.unrestricted(tenant):
        return None
    return lambda name: tenancy.allows(tenant, model_key(name))


def _view(build: Callable[[Any], dict[str, Any] | web.Response]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        answer = build(request.app[GATEWAY].fleet)
        if isinstance(answer, web.Response):
            return answer
        allowed = _allowed(request)
        if allowed is not None:  # a tenant sees only the models it may use
            for field, name in (("models", "name"), ("data", "id")):
                if field in answer:
                    answer[field] = [m for m in answer[field] if allowed(m[name])]
        return web.json_response(answer)

    return handler


async def _openai_model(request: web.Request) -> web.StreamResponse:
    name = request.match_info["model"]
    allowed = _allowed(request)
    if allowed is not None and not allowed(name):
        return openai_error(404, f"The model '{name}' does not exist")
    return catalog.openai_model(request.app[GATEWAY].fleet, name)


async def _openai_fallback(request: web.Request) -> web.StreamResponse:
    """Any other request under ``/v1``: OpenAI's 404, or 405 naming the allowed methods
    when the path exists (aiohttp would answer both in its own shape)."""
    allowed: set[str] = set()
    own = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not own:
            match, methods = await resource.resolve(request)
            allowed |= methods if match is None else set()
    if allowed:
        message = f"method {request.method} not allowed on {request.path}"
        return openai_error(405, message, Allow=", ".join(sorted(allowed)))
    return openai_error(404, f"no route {request.path}")


_FLEET_WIDE: dict[str, Handler] = {
    "/api/pull": models.pull,
    "/api/delete": models.delete,
    "/api/copy": models.copy,
}


async def _management(request: web.Request) -> web.StreamResponse:
    # The guard let only the admin token through. X-Olmd-Node names one node: the request
    # passes through to it as it is. Without it, pull, delete and copy go to the fleet.
    if not is_admin(request):  # defence in depth; the guard refuses first
        return json_error(403, "this route needs the admin token")
    gateway = request.app[GATEWAY]
    name = request.headers.get("X-Olmd-Node", "")
    if not name and request.path in _FLEET_WIDE:
        return await _FLEET_WIDE[request.path](request)
    node = gateway.fleet.get(name)
    if node is None:
        return json_error(400, "name the target node in the X-Olmd-Node header")
    return await gateway.proxy.pass_through(request, node)


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/", catalog.root)  # GET also answers HEAD
    router.add_get("/api/version", _view(catalog.version))
    router.add_get("/api/tags", _view(catalog.tags))
    router.add_get("/api/ps", _view(catalog.ps))
    router.add_get("/v1/models", _view(catalog.openai_models))
    # .+ : a model name may hold slashes (namespace/model, host/namespace/model).
    router.add_get("/v1/models/{model:.+}", _openai_model)
    for endpoint in ENDPOINTS:
        router.add_post(endpoint.path, _forwarder(endpoint))
    router.add_route("*", "/v1", _openai_fallback)
    router.add_route("*", "/v1/{tail:.*}", _openai_fallback)
    for path in ("/api/pull", "/api/push", "/api/create", "/api/copy"):
        router.add_post(path, _management)
    router.add_delete("/api/delete", _management)
    router.add_route("*", "/api/blobs/{digest}", _management)
    registry_routes.add_routes(app)
    admin.add_routes(app)
    ui.add_routes(app)
