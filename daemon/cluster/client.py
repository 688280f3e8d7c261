"""The cluster's Redis connection: one client, and whether Redis answers right now.

Every shared operation goes through :class:`Cluster`. A call that fails (Redis down,
slow, unreachable) raises :class:`ClusterDown` at once, marks the cluster disconnected
(``olmd_cluster_connected 0``, one log line) and the caller goes on on its own state; a
watcher pings Redis and marks it connected again when it answers. Nothing here is on a
request's path: the gateway publishes and reads on a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from aiohttp import web

from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.runtime import RUNTIME
from daemon.settings import ClusterSettings, Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = get_logger("olmd.cluster")
T = TypeVar("T")
_PING_EVERY = 0.5


class ClusterDown(Exception):
    """Redis did not answer; the caller goes on without the cluster for now."""


class Cluster:
    """This gateway's handle on the cluster: its name, its Redis client, key names."""

    def __init__(self, settings: ClusterSettings, url: str, metrics: Metrics | None = None):
        self.settings = settings
        self.name = settings.name
        self.prefix = settings.key_prefix
        self.metrics = metrics
        # Imported here: a gateway without a cluster never loads redis-py (~7 MB).
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        timeout = settings.redis_timeout
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            retry_on_timeout=False,
        )
        self.connected = False
        self._watcher: asyncio.Task[None] | None = None

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    async def call(self, operation: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run ``operation`` on the client; ClusterDown if Redis fails to answer."""
        try:
            result = await operation(self.redis)
        except self._errors as exc:
            self._set_connected(False, str(exc) or type(exc).__name__)
            raise ClusterDown(str(exc) or type(exc).__name__) from exc
        self._set_connected(True)
        return result

    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        if connected != self.connected:
            if connected:
                log.info("cluster_connected", gateway=self.name)
            else:
                log.warning("cluster_disconnected", gateway=self.name, error=error)
        self.connected = connected
        if self.metrics is not None:
            self.metrics.cluster_connected.set(1 if connected else 0)

    async def start(self) -> None:
        with contextlib.suppress(ClusterDown):
            await self.call(lambda r: r.ping())
        if not self.connected:  # say so even at start-up, where there is no transition
            log.warning("cluster_disconnected", gateway=self.name, error="no answer at start")
        self._watcher = asyncio.create_task(self._watch(), name="olmd-cluster-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_PING_EVERY)
            with contextlib.suppress(ClusterDown):
                await self.call(lambda r: r.ping())

    def alive(self) -> bool:
        return self._watcher is not None and not self._watcher.done()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        with contextlib.suppress(*self._errors):
            await self.redis.aclose()


CLUSTER = web.AppKey("olmd_cluster", Cluster)


def from_settings(settings: Settings, metrics: Metrics | None = None) -> Cluster | None:
    """The cluster these settings ask for, or None when it is off."""
    if not settings.cluster.enabled or settings.redis_url is None:
        return None
    return Cluster(settings.cluster, settings.redis_url.get_secret_value(), metrics)


async def cluster_component(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: ``app[CLUSTER]`` while the daemon runs, when the cluster is on.

    Runs before the gateway and the sync service, which find it there; a Redis that does
    not answer at start-up delays nothing (they go on on their own state).
    """
    runtime = app[RUNTIME]
    cluster = from_settings(runtime.settings, runtime.metrics)
    if cluster is None:
        yield
        return
    app[CLUSTER] = cluster
    await cluster.start()
    runtime.liveness.append(cluster.alive)
    try:
        yield
    finally:
        runtime.liveness.remove(cluster.alive)
        await cluster.stop()
