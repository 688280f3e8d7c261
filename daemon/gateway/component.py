"""The proxy's moving parts and their lifetime: connection pool, fleet, router, prober.

``gateway_component`` is an aiohttp cleanup context: it starts them in dependency order
(pool, fleet, first probe round bounded by ``health_timeout``, prober loop), and stops
them in reverse. SIGHUP swaps nodes, weights and routing without touching requests in
flight: those hold their own ``Node`` and finish on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from daemon.cluster.client import CLUSTER
from daemon.gateway.fleet import Fleet
from daemon.gateway.prober import Prober
from daemon.gateway.proxy import Proxy
from daemon.gateway.routing.router import Router, make_balancer
from daemon.gateway.shared import SharedFleet
from daemon.logs import get_logger
from daemon.runtime import RUNTIME
from daemon.settings import Settings

log = get_logger("olmd.gateway")


@dataclass(eq=False)
class Gateway:
    session: aiohttp.ClientSession
    fleet: Fleet
    router: Router
    prober: Prober
    proxy: Proxy

    async def reload(self, settings: Settings) -> None:
        # What can fail (loading the strategy's plugin) comes first, before anything
        # changes; the rest only assigns.
        balancer = make_balancer(settings.routing)
        before = {node.name for node in self.fleet}
        fresh = self.fleet.update(settings.nodes(), settings.routing)
        gone = before - {node.name for node in self.fleet}
        for name in gone | {node.name for node in fresh}:
            self.router.forget_node(name)  # another machine, or none: nothing learned holds
        self.router.reconfigure(settings.routing, balancer)
        self.proxy.configure(settings.routing)
        self.prober.configure(settings)
        for node in fresh:
            self.prober.probe_soon(node)
        if fresh:  # new nodes are useless until their models are known
            await asyncio.gather(*(self.prober.probe(node) for node in fresh))


GATEWAY = web.AppKey("gateway", Gateway)


def make_session() -> aiohttp.ClientSession:
    # One pool for every node, kept alive; no limit of its own (the router caps per node).
    # Bodies pass through as they are: no decompression, no cookie handling, and no
    # headers of aiohttp's own: an Accept-Encoding the client did not send could bring
    # back a compressed body the client cannot read.
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    )


async def gateway_component(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    settings = runtime.settings
    clock = time.monotonic
    session = make_session()
    try:
        fleet = Fleet(settings.nodes(), settings.routing)
        router = Router(fleet, settings.routing, clock)
        prober = Prober(fleet, session, settings, clock)
        proxy = Proxy(fleet, router, session, runtime.metrics, settings.routing)
        gateway = Gateway(session, fleet, router, prober, proxy)
        app[GATEWAY] = gateway
        # Start-up waits at most health_timeout for the first round; nodes it did not
        # reach (a fleet larger than probe_concurrency) are probed by the loop at once.
        try:
            async with asyncio.timeout(settings.services.ollama.health_timeout):
                await prober.probe_all()
        except TimeoutError:
            log.warning("first_probe_round_incomplete")
        healthy = sum(
            1 for n in fleet if n.probed_at is not None and not n.health.down and n.models
        )
        log.info("first_probe_round", nodes=len(fleet), answering=healthy)
        runtime.metrics.watch_fleet(lambda: app[GATEWAY].fleet, lambda: app[GATEWAY].router)
        prober.start()
        runtime.liveness.append(prober.alive)
        runtime.on_reload.append(gateway.reload)
        cluster = app.get(CLUSTER)
        shared = SharedFleet(fleet, router, cluster) if cluster is not None else None
        if shared is not None:
            shared.start()
            runtime.liveness.append(shared.alive)
        try:
            yield
        finally:
            if shared is not None:
                runtime.liveness.remove(shared.alive)
                await shared.stop()
            await prober.stop()
    finally:
        await session.close()
