"""Active health checks: every node, every ``probe_interval``, with bounded concurrency.

A probe is ``GET /api/version``, ``/api/tags`` and ``/api/ps`` within ``health_timeout``.
Each node has its own schedule, so a node that times out delays nobody else. Nodes out
of rotation or part-way through a rise or fall count are probed four times as often, so a
node that comes back is in rotation within one interval. One bad probe never stops the
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aiohttp

from daemon.gateway.fleet import Fleet, Node
from daemon.logs import get_logger
from daemon.settings import Settings

log = get_logger("olmd.prober")


class ProbeError(Exception):
    pass


async def _get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        if response.status != 200:
            raise ProbeError(f"GET {url} answered {response.status}")
        return await response.json(content_type=None)


class Prober:
    def __init__(
        self,
        fleet: Fleet,
        session: aiohttp.ClientSession,
        settings: Settings,
        clock: Callable[[], float],
    ) -> None:
        self.fleet = fleet
        self.session = session
        self.clock = clock
        self._due: dict[str, float] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        self.interval = settings.routing.probe_interval
        self.timeout = settings.services.ollama.health_timeout
        concurrency = settings.routing.probe_concurrency
        # A new semaphore only when the bound changes: probes in flight hold the old one.
        if getattr(self, "_concurrency", None) != concurrency:
            self._concurrency = concurrency
            self._limit = asyncio.Semaphore(concurrency)

    def probe_soon(self, node: Node) -> None:
        self._due[node.name] = 0.0

    async def probe(self, node: Node) -> bool:
        """Probe one node now and report the result to the fleet."""
        base = node.url
        try:
            async with self._limit, asyncio.timeout(self.timeout):
                version = await _get_json(self.session, f"{base}/api/version")
                tags = await _get_json(self.session, f"{base}/api/tags")
                ps = await _get_json(self.session, f"{base}/api/ps")
            self.fleet.probe_ok(
                node,
                self.clock(),
                version=version.get("version") if isinstance(version, dict) else None,
                tags=_entries(tags),
                ps=_entries(ps),
            )
            return True
        except TimeoutError:
            detail = f"no answer within {self.timeout:g}s"
        except (aiohttp.ClientError, ProbeError, ValueError, OSError) as exc:
            detail = node.redact(str(exc) or type(exc).__name__)
        self.fleet.probe_failed(node, self.clock(), detail)
        return False

    async def probe_all(self) -> None:
        """Probe every node once, now (start-up, tests)."""
        nodes = list(self.fleet)
        await asyncio.gather(*(self.probe(n) for n in nodes))
        now = self.clock()
        for node in nodes:
            self._due[node.name] = now + self.interval

    def _next_due(self, node: Node, now: float) -> float:
        # A node out of rotation, or counting towards rise or fall, is checked again
        # soon: a node that comes back is in rotation well within one interval, and a
        # failing one is confirmed down quickly.
        soon = node.health.in_transition or not node.health.is_routable(now)
        return now + (self.interval / 4 if soon else self.interval)

    async def _probe_one(self, node: Node) -> None:
        try:
            await self.probe(node)
        except Exception as exc:  # a bug in one probe must not stop the others
            log.error("probe_crashed", node=node.name, error=repr(exc))
        finally:
            self._running.pop(node.name, None)
            self._due[node.name] = self._next_due(node, self.clock())

    async def _run(self) -> None:
        # Each node on its own schedule: a node that times out delays only itself.
        while True:
            now = self.clock()
            names = set()
            for node in self.fleet:
                names.add(node.name)
                if node.name not in self._running and self._due.get(node.name, 0.0) <= now:
                    self._running[node.name] = asyncio.create_task(
                        self._probe_one(node), name=f"olmd-probe-{node.name}"
                    )
            for gone in set(self._due) - names:
                del self._due[gone]
            await asyncio.sleep(min(0.25, self.interval / 4))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="olmd-prober")

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._task = None
        self._running.clear()


def _entries(payload: Any) -> list[dict[str, Any]]:
    models = payload.get("models") if isinstance(payload, dict) else None
    return [m for m in models if isinstance(m, dict)] if isinstance(models, list) else []
