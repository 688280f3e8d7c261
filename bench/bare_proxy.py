"""The floor for a Python proxy: a bare aiohttp pass-through on uvloop, round-robin over the
nodes, bytes copied as they arrive. No routing, metrics, guard or failover; what olmd
costs beyond this column is olmd's own work.

    python bench/bare_proxy.py --port P --nodes PORT [PORT ...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

HOST = "127.0.0.1"
SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(nodes: list[int]) -> web.Application:
    upstreams = itertools.cycle(f"http://{HOST}:{port}" for port in nodes)
    app = web.Application()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app[SESSION] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session = app[SESSION]
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        url = next(upstreams) + request.path_qs
        async with session.post(url, data=body, headers=headers) as upstream:
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "bare"})

    app.cleanup_ctx.append(session_ctx)
    app.router.add_get("/api/version", version)
    app.router.add_post("/api/{tail:.*}", forward)
    return app


async def serve(port: int, nodes: list[int]) -> None:
    runner = web.AppRunner(make_app(nodes), access_log=None, handler_cancellation=True)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, HOST, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--nodes", type=int, nargs="+", required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.nodes))


if __name__ == "__main__":
    main()
