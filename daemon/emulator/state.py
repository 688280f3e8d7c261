"""The emulated node's live state: models, loads, pull progress and the request gates.

:class:`EmulatorState` is what one emulator knows while it runs: its config and stats,
the models on disk, the bytes each unfinished pull has, the concurrency gate that admits,
queues or rejects requests (``concurrency`` and ``queue``), and the models in memory with
their slots (a :class:`~daemon.emulator.slots.SlotTable`: Ollama's ``OLLAMA_NUM_PARALLEL``,
``OLLAMA_MAX_LOADED_MODELS`` and keep-alive). :meth:`EmulatorState.acquire` waits, in
arrival order, for a model and a slot, doing the cold load when it falls to its request.
The application keeps the state at ``app[STATE_KEY]``. :func:`hold` is the wait every
handler uses, so a client that leaves is noticed (:class:`ClientGone`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections import deque
from typing import Any

from aiohttp import web

from daemon.emulator import formats as fmt
from daemon.emulator.bodies import default_digest, is_embedding
from daemon.emulator.config import EmulatorConfig, Stats, normalize
from daemon.emulator.formats import Reject
from daemon.emulator.slots import DEFAULT_CONTEXT, Lease, Load, SlotTable, Wait, WaitReason

_POLL = 0.05  # how often a waiting handler checks that its client is still there


class ClientGone(Exception):
    """The client closed its connection while the emulator was waiting."""


def _gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def hold(
    request: web.BaseRequest, seconds: float | None, until: asyncio.Future[Any] | None = None
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


@dataclasses.dataclass(eq=False, slots=True)
class _Waiter:
    """A request waiting for a model (and a slot); ``turn`` resolves to what it got."""

    name: str
    prompt: list[int] | None
    turn: asyncio.Future[Lease | Load]
    since: int  # perf_counter_ns when ``reason`` was last set
    context: int = DEFAULT_CONTEXT  # the num_ctx it asks for
    reason: WaitReason | None = None
    load_ns: int = 0  # time spent waiting while the model was not in memory

    def mark(self, reason: WaitReason | None, now: int) -> None:
        if self.reason in ("loading", "room"):
            self.load_ns += now - self.since
        self.reason, self.since = reason, now


class EmulatorState:
    """The live node: config, models on disk and in memory, pull progress, request gate."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.stopping = False  # set by Emulator.stop: requests it cuts are not cancellations
        self._started = time.time_ns()
        self.modified: dict[str, int] = {}  # name → ns since the epoch
        self.pull_progress: dict[str, int] = {}  # bytes already downloaded, kept for resume
        # Models pulled from a registry: their manifest bytes (the digest is their sha256),
        # and the blobs on disk (digests only: the bytes are not kept).
        self.manifests: dict[str, bytes] = {}
        self.blobs: set[str] = set()
        self.models = SlotTable(
            num_parallel=config.num_parallel,
            max_loaded=config.max_loaded,
            cache_tokens=config.cache_tokens,
            single=is_embedding,
        )
        self._waiters: deque[asyncio.Future[None]] = deque()  # at the concurrency gate
        self._queue: list[_Waiter] = []  # for a model or a slot, in arrival order

    def update(self, patch: dict[str, Any]) -> None:
        """Apply a partial config; on ValidationError the old config stays."""
        self.config = cfg = EmulatorConfig.model_validate({**self.config.model_dump(), **patch})
        self.models.configure(
            num_parallel=cfg.num_parallel, max_loaded=cfg.max_loaded, cache_tokens=cfg.cache_tokens
        )
        self._wake()
        self._dispatch()

    def find(self, name: str) -> str | None:
        wanted = normalize(name).lower()
        return next((m for m in self.config.models if m.lower() == wanted), None)

    def digest(self, name: str) -> str:
        raw = self.manifests.get(name)
        if raw is not None:
            return hashlib.sha256(raw).hexdigest()
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
        self.models.unload(name)
        self.modified.pop(name, None)
        self.manifests.pop(name, None)

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

    # ------------------------------------------------------------ models in memory

    @property
    def loaded(self) -> dict[str, int]:
        """name → expiry (ns since the epoch) of each model in memory."""
        return self.models.expiries()

    def context_of(self, name: str) -> int:
        """The num_ctx the runner of ``name`` was loaded with."""
        model = self.models.resident(name)
        return model.context if model is not None else DEFAULT_CONTEXT

    def is_loaded(self, name: str) -> bool:
        return self.models.resident(name) is not None

    async def acquire(
        self,
        request: web.Request,
        name: str,
        prompt: list[int] | None,
        keep_alive: float,
        context: int | None = None,
    ) -> tuple[Lease, int]:
        """Start a request on ``name``: a slot for ``prompt`` (None: no slot, as for a
        bare load; empty: a slot with nothing cached, as for an embedding), loading the
        model first if that falls to this request (``keep_alive`` is then the expiry
        /api/ps shows until a request finishes). Waits in arrival order: for a slot of a
        loaded model without bound, for a load with at most ``queue`` others (then
        Ollama's 503). Returns the lease, for :meth:`finish`, and the ns spent waiting
        for or doing a cold load (waiting for a slot of a loaded model is not loading)."""
        ctx = context or DEFAULT_CONTEXT
        grant, load_ns = await self._turn(request, name, prompt, ctx)
        if isinstance(grant, Lease):
            lease = grant
        else:
            began = time.perf_counter_ns()
            self.stats.evictions += len(grant.evicted)
            try:
                if self.config.load_delay:
                    await hold(request, self.config.load_delay)
            except BaseException:
                self.models.abort_load(name)
                self._dispatch()  # another request for the model loads it
                raise
            lease = self.models.loaded(name, prompt, int(keep_alive * 1e9), ctx)
            self.stats.cold_loads += 1
            load_ns += time.perf_counter_ns() - began
            self._dispatch()  # those that waited for this load
        if lease.generating:
            self._in_use(name, 1)
        self.stats.cache_saved += lease.saved
        self.stats.cache_restored += lease.restored
        return lease, load_ns

    def transfer_seconds(self, lease: Lease) -> float:
        """The time the lease's swap with the host cache takes (0 without one)."""
        cfg, moved = self.config, lease.saved + lease.restored
        rate = cfg.restore_rate or 10 * cfg.prompt_rate
        return moved / rate if moved and rate else 0.0

    def finish(self, lease: Lease, holds: list[int] | None, keep_alive: float | None) -> None:
        """Give back what :meth:`acquire` gave: the slot now caches ``holds`` (None: as
        before); the model stays ``keep_alive`` seconds from now (None: as before)."""
        keep_ns = None if keep_alive is None else int(keep_alive * 1e9)
        self.models.finish(lease, holds, keep_ns)
        if lease.generating:
            self._in_use(lease.model.name, -1)
        self._dispatch()

    def unload(self, name: str) -> None:
        self.models.unload(name)

    async def _turn(
        self, request: web.Request, name: str, prompt: list[int] | None, context: int
    ) -> tuple[Lease | Load, int]:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(
            name, prompt, loop.create_future(), time.perf_counter_ns(), context=context
        )
        self._queue.append(waiter)
        self._dispatch()
        if not waiter.turn.done():
            # As Ollama's scheduler: a request for a loaded model waits for its runner
            # without bound; only those waiting for a load fill OLLAMA_MAX_QUEUE.
            if waiter.reason != "slot" and self._loads_waiting() > self.config.queue:
                self._queue.remove(waiter)
                self.stats.rejected += 1
                raise Reject(503, fmt.ERR_MAX_QUEUE)
            self.stats.queued += 1
            try:
                await hold(request, None, waiter.turn)
            except BaseException:
                if waiter.turn.done():  # granted just as this request left
                    self._give_back(waiter.turn.result())
                else:
                    self._queue.remove(waiter)
                raise
            finally:
                self.stats.queued -= 1
        return waiter.turn.result(), waiter.load_ns

    def _loads_waiting(self) -> int:
        return sum(1 for w in self._queue if w.reason in ("loading", "room"))

    def _give_back(self, grant: Lease | Load) -> None:
        if isinstance(grant, Load):
            self.models.abort_load(grant.name)
        else:
            self.models.finish(grant)
        self._dispatch()

    def _dispatch(self) -> None:
        """Grant, in arrival order, every waiting request the table now lets run."""
        now = time.perf_counter_ns()
        for waiter in list(self._queue):
            got = self.models.take(waiter.name, waiter.prompt, waiter.context)
            if isinstance(got, Wait):
                waiter.mark(got.reason, now)
                continue
            waiter.mark(None, now)
            self._queue.remove(waiter)
            waiter.turn.set_result(got)

    def _in_use(self, name: str, delta: int) -> None:
        stats = self.stats
        count = stats.slots_in_use.get(name, 0) + delta
        if count > 0:
            stats.slots_in_use[name] = count
        else:
            stats.slots_in_use.pop(name, None)
        if delta > 0:
            stats.max_slots_in_use[name] = max(stats.max_slots_in_use.get(name, 0), count)

    # ------------------------------------------------------------ the concurrency gate

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
