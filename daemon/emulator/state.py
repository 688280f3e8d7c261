"""The emulated node's live state: models, loads, pull progress and the concurrency gate.

:class:`EmulatorState` is what one emulator knows while it runs: its config and stats,
the models on disk and in memory, the bytes each unfinished pull has, and the gate that
admits, queues or rejects requests (Ollama's ``OLLAMA_NUM_PARALLEL`` and
``OLLAMA_MAX_QUEUE``). The application keeps it at ``app[STATE_KEY]``. :func:`hold` is
the wait every handler uses, so a client that leaves is noticed (:class:`ClientGone`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from aiohttp import web

from daemon.emulator import formats as fmt
from daemon.emulator.bodies import default_digest
from daemon.emulator.config import EmulatorConfig, Stats, normalize
from daemon.emulator.formats import Reject

_POLL = 0.05  # how often a waiting handler checks that its client is still there


class ClientGone(Exception):
    """The client closed its connection while the emulator was waiting."""


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def hold(
    request: web.BaseRequest, seconds: float | None, until: asyncio.Future[None] | None = None
) -> None:
    """Wait ``seconds`` (None: for ever) or until ``until`` is done; ClientGone if the
    client leaves first. Only called for non-zero delays, so it costs the hot path nothing."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while until is None or not until.done():
        step = _POLL if deadline is None else min(_POLL, deadline - loop.time())
        if step <= 0:
            return
        if until is None:
            await asyncio.sleep(step)
        else:
            await asyncio.wait((until,), timeout=step)
        if _gone(request):
            raise ClientGone


class EmulatorState:
    """The live node: config, models on disk and in memory, pull progress, request gate."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.stopping = False  # set by Emulator.stop: requests it cuts are not cancellations
        self._started = time.time_ns()
        self.modified: dict[str, int] = {}  # name → ns since the epoch
        self.loaded: dict[str, int] = {}  # name → expiry, ns since the epoch
        self.pull_progress: dict[str, int] = {}  # bytes already downloaded, kept for resume
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()

    def update(self, patch: dict[str, Any]) -> None:
        """Apply a partial config; on ValidationError the old config stays."""
        self.config = EmulatorConfig.model_validate({**self.config.model_dump(), **patch})
        self._wake()

    def find(self, name: str) -> str | None:
        wanted = normalize(name).lower()
        return next((m for m in self.config.models if m.lower() == wanted), None)

    def digest(self, name: str) -> str:
        return self.config.digests.get(name.lower()) or default_digest(name)

    def modified_ns(self, name: str) -> int:
        return self.modified.get(name, self._started)

    def by_age(self) -> list[tuple[str, int]]:
        """(name, modified) newest first, the order of Ollama's lists."""
        entries = [(m, self.modified_ns(m)) for m in self.config.models]
        return sorted(entries, key=lambda e: e[1], reverse=True)

    def add_model(self, name: str) -> None:
        if self.find(name) is None:
            self.config = self.config.model_copy(update={"models": [*self.config.models, name]})
        self.modified[name] = time.time_ns()

    def remove_model(self, name: str) -> None:
        models = [m for m in self.config.models if m != name]
        self.config = self.config.model_copy(update={"models": models})
        self.loaded.pop(name, None)
        self.modified.pop(name, None)

    def take_fault(self, route: str) -> tuple[str, int]:
        """(kind, fault_after) for a request to ``route``, counted against fault_count."""
        cfg = self.config
        if cfg.fault == "none" or route not in cfg.fault_routes:
            return ("none", 0)
        if cfg.fault_count:
            left = cfg.fault_count - 1
            update = {"fault_count": left, "fault": cfg.fault if left else "none"}
            self.config = cfg.model_copy(update=update)
        self.stats.faults += 1
        return (cfg.fault, cfg.fault_after)

    def is_loaded(self, name: str) -> bool:
        expiry = self.loaded.get(name)
        if expiry is not None and expiry < time.time_ns():
            del self.loaded[name]
            return False
        return expiry is not None

    async def ensure_loaded(self, request: web.Request, name: str, keep_alive: float) -> None:
        """Load ``name`` if needed; concurrent requests share one cold load."""
        while not self.is_loaded(name):  # loops again only if the loading request left
            pending = self._loading.get(name)
            if pending is not None:
                await hold(request, None, pending)
                continue
            pending = asyncio.get_running_loop().create_future()
            self._loading[name] = pending
            try:
                if self.config.load_delay:
                    await hold(request, self.config.load_delay)
                self.loaded[name] = time.time_ns() + int(keep_alive * 1e9)
            finally:
                del self._loading[name]
                pending.set_result(None)
        self.loaded[name] = time.time_ns() + int(keep_alive * 1e9)

    async def admit(self, request: web.Request) -> None:
        """Pass the concurrency gate, queueing if allowed, else Reject with Ollama's 503."""
        cfg, stats = self.config, self.stats
        if not cfg.concurrency or (stats.in_flight < cfg.concurrency and not self._waiters):
            self._enter()
            return
        if len(self._waiters) >= cfg.queue:
            stats.rejected += 1
            raise Reject(503, fmt.ERR_MAX_QUEUE)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        stats.queued += 1
        try:
            await hold(request, None, turn)
        except BaseException:
            if turn.done():  # the slot was handed over just as this request left
                self.release()
            else:
                self._waiters.remove(turn)
            raise
        finally:
            stats.queued -= 1

    def release(self) -> None:
        self.stats.in_flight -= 1
        self._wake()

    def _enter(self) -> None:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)

    def _wake(self) -> None:
        limit = self.config.concurrency
        while self._waiters and (not limit or self.stats.in_flight < limit):
            self._enter()
            self._waiters.popleft().set_result(None)


STATE_KEY = web.AppKey("olmd_emulator_state", EmulatorState)
