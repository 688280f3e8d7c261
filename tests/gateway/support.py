"""Helpers the proxy tests share: request helpers and a hand-made node."""

from __future__ import annotations

from typing import Any

import aiohttp

MODEL = "llama3.1:8b"
GENERATE = {"model": MODEL, "prompt": "hi", "stream": False}


def url(server: Any, path: str) -> str:
    return str(server.make_url(path))


async def post(
    http: aiohttp.ClientSession, server: Any, path: str, body: Any
) -> tuple[int, str, Any]:
    async with http.post(url(server, path), json=body) as response:
        data = await response.json(content_type=None)
        return response.status, response.headers.get("X-Olmd-Node", ""), data


async def one_node_app(models: tuple[str, ...] = (MODEL,), **posts: Any) -> tuple[Any, int]:
    """A hand-made node holding ``models``: Ollama's probe routes, plus ``posts``
    ({"pull": handler})."""
    from aiohttp import web

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": m, "model": m} for m in models]})

    async def ps(request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    for name, handler in posts.items():
        app.router.add_post(f"/api/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])
