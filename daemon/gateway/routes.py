"""The route table: every path olmd answers, and which handler answers it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon.gateway import admin, catalog
from daemon.gateway.component import GATEWAY
from daemon.gateway.guard import is_admin
from daemon.gateway.proxy import Endpoint
from daemon.gateway.wire import json_error

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

    return handler


def _view(build: Callable[[Any], dict[str, Any]]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(build(request.app[GATEWAY].fleet))

    return handler


async def _management(request: web.Request) -> web.StreamResponse:
    # The guard let only the admin token through. The target node is named explicitly:
    # model management is the sync engine's job, this is the operator's escape hatch.
    if not is_admin(request):  # defence in depth; the guard refuses first
        return json_error(403, "this route needs the admin token")
    gateway = request.app[GATEWAY]
    name = request.headers.get("X-Olmd-Node", "")
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
    for endpoint in ENDPOINTS:
        router.add_post(endpoint.path, _forwarder(endpoint))
    for path in ("/api/pull", "/api/push", "/api/create", "/api/copy"):
        router.add_post(path, _management)
    router.add_delete("/api/delete", _management)
    router.add_route("*", "/api/blobs/{digest}", _management)
    admin.add_routes(app)
