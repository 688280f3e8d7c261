"""The route table: every path olmd answers, and which handler answers it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.gateway import admin, catalog, management, registry_routes, ui
from daemon.gateway.component import GATEWAY
from daemon.gateway.dialects import dialect_of, error_for, model_not_found
from daemon.gateway.endpoint import Endpoint
from daemon.gateway.fleet import model_key
from daemon.gateway.guard import as_dialect
from daemon.gateway.tenants import TENANCY
from daemon.gateway.wire import ANONYMOUS, TENANT
from daemon.runtime import RUNTIME
from daemon.settings import DEFAULT_TENANT

ENDPOINTS = (
    Endpoint("/api/generate", "/api/generate", streams=True),
    Endpoint("/api/chat", "/api/chat", streams=True),
    Endpoint("/api/embed", "/api/embed"),
    Endpoint("/api/embeddings", "/api/embeddings"),
    Endpoint("/api/show", "/api/show"),
    Endpoint("/v1/chat/completions", "/v1/chat/completions", "openai", streams=True),
    Endpoint("/v1/completions", "/v1/completions", "openai", streams=True),
    Endpoint("/v1/embeddings", "/v1/embeddings", "openai"),
    Endpoint("/v1/responses", "/v1/responses", "openai", streams=True, events=True),
    # Answered whole once the transcript is done, however the form asks.
    Endpoint("/v1/audio/transcriptions", "/v1/audio/transcriptions", "openai", form=True),
    Endpoint("/v1/messages", "/v1/messages", "anthropic", streams=True, events=True),
    # The deployment guide's wrapper routes: same bodies and answers as the native ones.
    Endpoint("/api/v1/llm/generate", "/api/generate", streams=True),
    Endpoint("/api/v1/llm/chat", "/api/chat", streams=True),
    Endpoint("/api/v1/llm/embeddings", "embeddings"),  # /api/embed or /api/embeddings by body
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _forwarder(endpoint: Endpoint) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await request.app[GATEWAY].proxy.forward(request, endpoint)

    if endpoint.dialect == "ollama":
        return handler

    async def v1_handler(request: web.Request) -> web.StreamResponse:
        # aiohttp's own errors (413 from reading the body) in the route's shape; a try
        # costs nothing until something raises.
        try:
            return await request.app[GATEWAY].proxy.forward(request, endpoint)
        except web.HTTPException as exc:
            reply = as_dialect(exc, request.app[RUNTIME], endpoint.dialect)
            if reply is None:
                raise
            return reply

    return v1_handler


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


async def _version(request: web.Request) -> web.StreamResponse:
    """``/api/version``; without a key while keys are required, the version alone."""
    return catalog.version(request.app[GATEWAY].fleet, full=not request.get(ANONYMOUS))


async def _openai_model(request: web.Request) -> web.StreamResponse:
    name = request.match_info["model"]
    allowed = _allowed(request)
    if allowed is not None and not allowed(name):
        return model_not_found("openai", name)
    return catalog.openai_model(request.app[GATEWAY].fleet, name)


async def _v1_fallback(request: web.Request) -> web.StreamResponse:
    """Any other request under ``/v1``: a 404, or a 405 naming the allowed methods when
    the path exists, in OpenAI's shape (Anthropic's under ``/v1/messages``): aiohttp
    would answer both in its own."""
    allowed: set[str] = set()
    own = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not own:
            match, methods = await resource.resolve(request)
            allowed |= methods if match is None else set()
    error = error_for(dialect_of(request.path))
    if allowed:
        message = f"method {request.method} not allowed on {request.path}"
        return error(405, message, Allow=", ".join(sorted(allowed)))
    return error(404, f"no route {request.path}")


def add_routes(app: web.Application) -> None:
    router = app.router
    router.add_get("/", catalog.root)  # GET also answers HEAD
    router.add_get("/api/version", _version)
    router.add_get("/api/tags", _view(catalog.tags))
    router.add_get("/api/ps", _view(catalog.ps))
    router.add_get("/v1/models", _view(catalog.openai_models))
    # .+ : a model name may hold slashes (namespace/model, host/namespace/model).
    router.add_get("/v1/models/{model:.+}", _openai_model)
    for endpoint in ENDPOINTS:
        router.add_post(endpoint.path, _forwarder(endpoint))
    router.add_route("*", "/v1", _v1_fallback)
    router.add_route("*", "/v1/{tail:.*}", _v1_fallback)
    for path in ("/api/pull", "/api/push", "/api/create", "/api/copy"):
        router.add_post(path, management.handler)
    router.add_delete("/api/delete", management.handler)
    router.add_route("*", "/api/blobs/{digest}", management.handler)
    registry_routes.add_routes(app)
    admin.add_routes(app)
    ui.add_routes(app)
