"""Model sync: the one entry point for the CLI, the scheduler and the admin API.

* :func:`run_sync` runs one sync under the lock and returns its result (``olmd sync``).
* :class:`SyncService` is the daemon's handle: start a run in the background (refused
  while one runs, here or in another process), report progress and the last result.
* :func:`sync_component` is the daemon's cleanup context: it puts a service on the
  application (``app[SYNC]``) and runs the nightly scheduler while the daemon runs.

The engine is :mod:`daemon.sync.engine`, the pure half :mod:`daemon.sync.plan`, what the
nodes hold :mod:`daemon.sync.inventory`, the manifest of a run :mod:`daemon.sync.run_manifest`,
the lock and the state file :mod:`daemon.sync.state`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from daemon.logs import get_logger
from daemon.metrics import SyncMetrics
from daemon.runtime import RUNTIME
from daemon.settings import Settings
from daemon.sync.engine import Backoff, Clock, Now, SyncEngine, TransportFactory, utcnow
from daemon.sync.plan import SyncOptions, SyncProgress, SyncResult, select_targets
from daemon.sync.scheduler import SyncScheduler
from daemon.sync.state import SyncBusy, SyncLock, SyncState, lock_path, read_state, state_path
from daemon.sync.status import ManifestSummary, NextRun, schedule_status

__all__ = [
    "SYNC",
    "SyncBusy",
    "SyncOptions",
    "SyncResult",
    "SyncService",
    "run_sync",
    "stop_grace",
    "sync_component",
]

log = get_logger("olmd.sync")

_STOP_MARGIN = 5.0  # seconds on top of the final inventory's own bound


def stop_grace(settings: Settings) -> float:
    """Seconds a stopping daemon gives a run to write its manifest: time to take the cut
    pulls down and then the final inventory, whose per-node requests (tags, then
    version) are each bounded by ``health_timeout``, plus a margin."""
    return 2 * settings.services.ollama.health_timeout + _STOP_MARGIN


async def run_sync(
    settings: Settings,
    options: SyncOptions,
    *,
    now: Now = utcnow,
    clock: Clock = time.monotonic,
    progress: SyncProgress | None = None,
    metrics: SyncMetrics | None = None,
    transports: TransportFactory | None = None,
    backoff: Backoff | None = None,
    on_engine: Callable[[SyncEngine], None] | None = None,
) -> SyncResult:
    """One sync run, under the lock (a dry run takes none: it changes nothing).

    ``on_engine`` is handed the run's engine before it starts, e.g. to wire signals to
    :meth:`SyncEngine.stop` (``olmd sync`` does).

    Raises :class:`SyncBusy` if another run holds the lock, ``ValueError`` for options
    the settings cannot satisfy (an unknown ``host``), and ``OSError`` when the manifest
    or state file cannot be written. Failed pulls are not exceptions: see
    ``SyncResult.ok``.
    """
    engine = SyncEngine(
        settings, options, now=now, clock=clock, progress=progress, metrics=metrics,
        transports=transports, backoff=backoff,
    )  # fmt: skip
    if on_engine is not None:
        on_engine(engine)
    if options.dry_run:
        return await engine.run()
    with SyncLock(lock_path(settings.jobs.ollama_sync.manifest_path)):
        return await engine.run()


class SyncService:
    """Runs syncs in the background of the daemon; at most one at a time.

    The run task belongs to the service: :meth:`stop` ends it (gracefully first, so the
    manifest records what was cut as deferred). A reload takes effect at the next run;
    a running one finishes on the settings it started with.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: SyncMetrics | None = None,
        *,
        now: Now = utcnow,
        clock: Clock = time.monotonic,
        transports: TransportFactory | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._now, self._clock = now, clock
        self._transports, self._backoff = transports, backoff
        self._task: asyncio.Task[None] | None = None
        self._engine: SyncEngine | None = None
        self._trigger: str | None = None
        self._last: SyncResult | None = None
        self._last_error: str | None = None
        self._manifest = ManifestSummary()
        self.next_run: NextRun | None = None
        """When the nightly job fires next; the scheduler's, set by ``sync_component``."""
        if metrics is not None:
            state = self.state()
            metrics.restore(
                last_run=state.last_finished_at.timestamp() if state.last_finished_at else None,
                last_success=state.last_success_at.timestamp() if state.last_success_at else None,
            )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def last_result(self) -> SyncResult | None:
        return self._last

    def state(self) -> SyncState:
        """The last run as the state file records it (it may be a CLI run)."""
        return read_state(state_path(self.settings.jobs.ollama_sync.manifest_path))

    async def start(self, options: SyncOptions | None = None, *, trigger: str = "api") -> bool:
        """Start a run in the background; False if one is running (here, or another
        process holds the lock). Raises ``ValueError`` for options the settings cannot
        satisfy (an unknown ``host``) before anything starts."""
        options = options or SyncOptions()
        if self.running:
            log.info("sync.refused", trigger=trigger, reason="a sync is already running")
            return False
        select_targets(self.settings, options.host)
        lock = None
        if not options.dry_run:
            lock = SyncLock(lock_path(self.settings.jobs.ollama_sync.manifest_path))
            try:
                lock.acquire()
            except SyncBusy as exc:
                log.info("sync.refused", trigger=trigger, reason=str(exc))
                return False
        engine = SyncEngine(
            self.settings, options, now=self._now, clock=self._clock, metrics=self._metrics,
            transports=self._transports, backoff=self._backoff,
        )  # fmt: skip
        self._engine, self._trigger = engine, trigger
        self._task = asyncio.create_task(self._run(engine, lock), name="olmd-sync")
        return True

    async def _run(self, engine: SyncEngine, lock: SyncLock | None) -> None:
        if self._metrics is not None:
            self._metrics.running.set(1)
        try:
            self._last, self._last_error = await engine.run(), None
        except Exception as exc:  # the service outlives a broken run; the state file says so
            log.exception("sync.run_failed", trigger=self._trigger)
            self._last_error = str(exc)
        finally:
            if lock is not None:
                lock.release()
            if self._metrics is not None:
                self._metrics.running.set(0)

    async def wait(self) -> SyncResult | None:
        """Wait for the running sync, if any; the last result."""
        if self._task is not None:
            await asyncio.wait({self._task})
        return self._last

    def status(self) -> dict[str, Any]:
        """JSON-compatible: whether a run is going, its progress, the last result (of
        this daemon) and last run (the state file: any process), the schedule and the
        window, and a summary of the manifest on disk."""
        engine = self._engine
        state = self.state()
        return {
            "running": self.running,
            "trigger": self._trigger,
            "options": engine.options.model_dump(mode="json") if engine else None,
            "progress": engine.progress.snapshot() if engine else None,
            "last_result": self._last.to_dict() if self._last else None,
            "last_error": self._last_error,
            "state": state.model_dump(mode="json"),
            "schedule": schedule_status(self.settings, self._now(), self.next_run),
            "manifest": self._manifest.read(self.settings.jobs.ollama_sync.manifest_path),
        }

    async def reload(self, settings: Settings) -> None:
        """Use ``settings`` from the next run on."""
        self.settings = settings

    async def stop(self, grace: float | None = None) -> None:
        """End a running sync: pulls are cut and recorded as deferred and the manifest is
        written; after ``grace`` seconds (default :func:`stop_grace` of the run's
        settings) the run is cancelled outright (logged)."""
        task, engine = self._task, self._engine
        if task is None or task.done() or engine is None:
            return
        if grace is None:
            grace = stop_grace(engine.settings)
        engine.stop("olmd is stopping")
        done, _ = await asyncio.wait({task}, timeout=grace)
        if not done:
            log.warning("sync.cancelled", reason=f"still running {grace:g} s after stop")
            task.cancel()
            await asyncio.wait({task})


SYNC = web.AppKey("olmd_sync", SyncService)


async def sync_component(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: ``app[SYNC]`` and the nightly scheduler, while the daemon runs.

    Uses a service already at ``app[SYNC]`` (tests put one with fake clocks there),
    else makes one whose metrics join the runtime's registry. Registers a reload hook
    (new settings for the service and the schedule) and a liveness check (the scheduler
    is running). On the way out: scheduler first, then a running sync is stopped with
    its manifest written.
    """
    runtime = app[RUNTIME]
    if SYNC not in app:
        app[SYNC] = SyncService(runtime.settings, SyncMetrics(runtime.metrics.registry))
    service = app[SYNC]
    scheduler = SyncScheduler(service, runtime.settings)

    async def reload(settings: Settings) -> None:
        await service.reload(settings)
        scheduler.reload(settings)

    scheduler.start()
    service.next_run = scheduler.next_run_time
    runtime.on_reload.append(reload)
    runtime.liveness.append(scheduler.alive)
    try:
        yield
    finally:
        runtime.liveness.remove(scheduler.alive)
        runtime.on_reload.remove(reload)
        service.next_run = None
        await scheduler.shutdown()
        await service.stop()
