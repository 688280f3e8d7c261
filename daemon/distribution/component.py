"""The daemon's distributor and its lifetime: ``app[DISTRIBUTION]`` while the daemon runs.

A cleanup context, started before the gateway (whose registry and model routes use it) and
the sync service (whose gateway-mode runs use it); it owns the HTTP session the registry
downloads go through and follows SIGHUP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from daemon.distribution.mirror import Distributor
from daemon.metrics import DistributionMetrics
from daemon.runtime import RUNTIME
from daemon.settings import Settings

__all__ = ["DISTRIBUTION", "distribution_component"]

DISTRIBUTION = web.AppKey("olmd_distribution", Distributor)


async def distribution_component(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    metrics = DistributionMetrics(runtime.metrics.registry)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    try:
        distributor = Distributor(runtime.settings, session, metrics=metrics)
        app[DISTRIBUTION] = distributor

        async def reload(settings: Settings) -> None:
            distributor.reconfigure(settings)

        runtime.on_reload.append(reload)
        try:
            yield
        finally:
            runtime.on_reload.remove(reload)
    finally:
        await session.close()
