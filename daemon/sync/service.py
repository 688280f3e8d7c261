"""Model sync: the one entry point for the CLI, the scheduler and the admin API.

* :func:`run_sync` runs one sync under the lock and returns its result (``olmd sync``).
* :class:`SyncService` is the daemon's handle: start a run in the background (refused
  while one runs, here or in another process), report progress and the last result.
* :func:`sync_component` is the daemon's cleanup context: it puts a service on the
  application (``app[SYNC]``) and runs the nightly scheduler while the daemon runs.
* :func:`offline_status` is ``olmd sync --status``: the same story without a daemon.

With the cluster on (a :class:`~daemon.cluster.client.Cluster` passed in), a run also
holds the fleet-wide sync lease: every gateway's scheduler may fire, one runs. No lease
(Redis down): no run, and the status says why (``blocked``). Every gateway reads the
shared run record (:mod:`daemon.sync.shared`) for its status, metrics and catch-up rule.

The engine is :mod:`daemon.sync.engine`, the pure half :mod:`daemon.sync.plan`, what the
nodes hold :mod:`daemon.sync.inventory`, the manifest of a run :mod:`daemon.sync.run_manifest`,
the lock and the state file :mod:`daemon.sync.state`, the lease and what a run writes
:mod:`daemon.sync.claim`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from daemon.cluster.client import CLUSTER, Cluster
from daemon.distribution.component import DISTRIBUTION
from daemon.distribution.mirror import Distributor, cache_status
from daemon.logs import get_logger
from daemon.metrics import SyncMetrics
from daemon.runtime import RUNTIME
from daemon.settings import Settings
from daemon.sync.claim import Claim, FencedOut, SyncBlocked, take_claim
from daemon.sync.engine import Backoff, Clock, Now, SyncEngine, TransportFactory, utcnow
from daemon.sync.plan import SyncOptions, SyncProgress, SyncResult, select_targets
from daemon.sync.scheduler import SyncScheduler
from daemon.sync.shared import SharedSync
from daemon.sync.state import SyncBusy, SyncState, read_state, state_path
from daemon.sync.status import ManifestSummary, NextRun, schedule_status

__all__ = [
    "SYNC",
    "FencedOut",
    "SyncBlocked",
    "SyncBusy",
    "SyncOptions",
    "SyncResult",
    "SyncService",
    "offline_status",
    "run_sync",
    "stop_grace",
    "sync_component",
]

log = get_logger("olmd.sync")

_STOP_MARGIN = 5.0  # seconds on top of the final inventory's own bound
_BLOCKED = "the cluster's Redis does not answer: no sync can start until it does"


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
    cluster: Cluster | None = None,
    distributor: Distributor | None = None,
) -> SyncResult:
    """One sync run, under the lock (a dry run takes none: it changes nothing); with
    ``cluster``, under the fleet-wide sync lease as well.

    ``on_engine`` is handed the run's engine before it starts, e.g. to wire signals to
    :meth:`SyncEngine.stop` (``olmd sync`` does).

    Raises :class:`SyncBusy` if another run holds the lock or the lease,
    :class:`SyncBlocked` if the cluster's Redis does not answer, :class:`FencedOut` if a
    newer holder of the lease took over meanwhile (this run then wrote no manifest),
    ``ValueError`` for options the settings cannot satisfy (an unknown ``host``), and
    ``OSError`` when the manifest or state file cannot be written. Failed pulls are not
    exceptions: see ``SyncResult.ok``.
    """
    claim = None if options.dry_run else await take_claim(settings, cluster)
    engine = SyncEngine(
        settings, options, now=now, clock=clock, progress=progress, metrics=metrics,
        transports=transports, backoff=backoff, recorder=claim, distributor=distributor,
    )  # fmt: skip
    if on_engine is not None:
        on_engine(engine)
    if claim is None:
        return await engine.run()
    error = None
    try:
        await claim.begin(
            trigger="cli", options=options, stop=engine.stop, progress=engine.progress,
            now=now(),
        )  # fmt: skip
        return await engine.run()
    except Exception as exc:
        error = str(exc)
        raise
    finally:
        await claim.release(progress=engine.progress, error=error)


class SyncService:
    """Runs syncs in the background of the daemon; at most one at a time (with the
    cluster on: at most one in the fleet).

    The run task belongs to the service: :meth:`stop` ends it (gracefully first, so the
    manifest records what was cut as deferred). A reload takes effect at the next run;
    a running one finishes on the settings it started with. With ``cluster``, the
    service reads the shared run record between :meth:`open` and :meth:`close`.
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
        cluster: Cluster | None = None,
        distributor: Distributor | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self.distributor = distributor
        self._now, self._clock = now, clock
        self._transports, self._backoff = transports, backoff
        self._cluster = cluster
        self._shared = (
            SharedSync(cluster, metrics, running_here=lambda: self.running)
            if cluster is not None
            else None
        )
        self._task: asyncio.Task[None] | None = None
        self._engine: SyncEngine | None = None
        self._trigger: str | None = None
        self._last: SyncResult | None = None
        self._last_error: str | None = None
        self._fence = 0  # the fencing number of this gateway's last run (cluster on)
        self._refusal: dict[str, Any] | None = None
        self._manifest = ManifestSummary()
        self.next_run: NextRun | None = None
        """When the nightly job fires next; the scheduler's, set by ``sync_component``."""
        if metrics is not None:
            state = self.state()
            metrics.restore(
                last_run=state.last_finished_at.timestamp() if state.last_finished_at else None,
                last_success=state.last_success_at.timestamp() if state.last_success_at else None,
            )

    async def open(self) -> None:
        """With the cluster on: read the shared record (before the scheduler's catch-up
        rule asks for the last run), then keep reading it."""
        if self._shared is not None:
            await self._shared.start()

    async def close(self) -> None:
        if self._shared is not None:
            await self._shared.close()

    async def refresh(self) -> None:
        """With the cluster on: read the shared record now (else it is read every second
        between :meth:`open` and :meth:`close`)."""
        if self._shared is not None:
            await self._shared.refresh()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def last_result(self) -> SyncResult | None:
        return self._last

    @property
    def refusal(self) -> dict[str, Any] | None:
        """The last start that was refused: when, its trigger, why, and whether the
        cluster blocked it (Redis down); None after a start that went ahead."""
        return self._refusal

    def state(self) -> SyncState:
        """The last run as the state file records it (it may be a CLI run); with the
        cluster on, the fleet's last run (the shared record, unless ours is newer)."""
        local = read_state(state_path(self.settings.jobs.ollama_sync.manifest_path))
        return local if self._shared is None else self._shared.merge_state(local)

    async def start(
        self,
        options: SyncOptions | None = None,
        *,
        trigger: str = "api",
        unless_ran_since: datetime | None = None,
    ) -> bool:
        """Start a run in the background; False if one is running (here, or another
        process holds the lock, or another gateway the lease), or if the cluster's Redis
        does not answer (:attr:`refusal` says which). Raises ``ValueError`` for options
        the settings cannot satisfy (an unknown ``host``) before anything starts.

        ``unless_ran_since`` (the scheduler's): with the cluster on, refused if a full
        run that started at or after it already ran to its end on any gateway, as the
        shared record says once the lease is held."""
        options = options or SyncOptions()
        if self.running:
            return self._refuse(trigger, SyncBusy("a sync is already running"))
        select_targets(self.settings, options.host)
        claim = None
        if not options.dry_run:
            known = self._shared.view.fence if self._shared and self._shared.view else 0
            try:
                claim = await take_claim(self.settings, self._cluster, known_fence=known)
            except SyncBusy as exc:
                return self._refuse(trigger, exc)
            why = claim.ran_since(unless_ran_since) if unless_ran_since is not None else None
            if why is not None and self._cluster is not None:
                await claim.release()
                return self._refuse(trigger, SyncBusy(why))
            options = claim.resume(options, trigger, self._now())
        engine = SyncEngine(
            self.settings, options, now=self._now, clock=self._clock, metrics=self._metrics,
            transports=self._transports, backoff=self._backoff, recorder=claim,
            distributor=self.distributor,
        )  # fmt: skip
        if claim is not None:
            self._fence = claim.fence or self._fence
            await claim.begin(
                trigger=trigger, options=options, stop=engine.stop, progress=engine.progress,
                now=self._now(),
            )  # fmt: skip
        self._engine, self._trigger, self._refusal = engine, trigger, None
        self._task = asyncio.create_task(self._run(engine, claim), name="olmd-sync")
        return True

    def _refuse(self, trigger: str, exc: SyncBusy) -> bool:
        log.info("sync.refused", trigger=trigger, reason=str(exc))
        self._refusal = {
            "at": self._now().isoformat(timespec="seconds"),
            "trigger": trigger,
            "reason": str(exc),
            "blocked": isinstance(exc, SyncBlocked),
        }
        return False

    async def _run(self, engine: SyncEngine, claim: Claim | None) -> None:
        if self._metrics is not None:
            self._metrics.running.set(1)
        error = None
        try:
            self._last, self._last_error = await engine.run(), None
        except Exception as exc:  # the service outlives a broken run; the state file says so
            log.exception("sync.run_failed", trigger=self._trigger)
            self._last_error = error = str(exc)
        finally:
            if claim is not None:
                await claim.release(progress=engine.progress, error=error)
            if self._metrics is not None:
                self._metrics.running.set(0)
            if self._shared is not None:
                await self._shared.refresh()

    async def wait(self) -> SyncResult | None:
        """Wait for the running sync, if any; the last result."""
        if self._task is not None:
            await asyncio.wait({self._task})
        return self._last

    def status(self) -> dict[str, Any]:
        """JSON-compatible: whether a run is going, its progress, the last result (of
        this daemon) and last run (the state file: any process), the schedule and the
        window, and a summary of the manifest on disk. With the cluster on, the fleet's
        run instead (the shared record), ``cluster`` (this gateway, Redis, the lease's
        holder) and ``blocked`` (why no sync can start, or None)."""
        engine = self._engine
        status = {
            "running": self.running,
            "trigger": self._trigger,
            "options": engine.options.model_dump(mode="json") if engine else None,
            "progress": engine.progress.snapshot() if engine else None,
            "last_result": self._last.to_dict() if self._last else None,
            "last_error": self._last_error,
            "state": self.state().model_dump(mode="json"),
            "schedule": schedule_status(self.settings, self._now(), self.next_run),
            "manifest": self._manifest.read(self.settings.jobs.ollama_sync.manifest_path),
            "refused": self._refusal,
            "blocked": None,
            "cache": self._cache_status(),
        }
        if self._shared is None or self._cluster is None:
            return status
        status = self._shared.overlay(status, here=self.running, own_fence=self._fence)
        status["blocked"] = None if self._cluster.connected else _BLOCKED
        return status

    def _cache_status(self) -> dict[str, Any] | None:
        """Gateway mode: olmd's blob cache (its models, size, downloads under way)."""
        if self.settings.distribution.mode != "gateway":
            return None
        if self.distributor is not None:
            return self.distributor.status()
        return cache_status(self.settings)

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


async def offline_status(settings: Settings, cluster: Cluster | None) -> dict[str, Any]:
    """``GET /admin/sync``'s answer without a daemon (``olmd sync --status``): the state
    file and manifest here, or with ``cluster`` the fleet's run from the shared record
    (``cluster.connected`` False: Redis did not answer, the local files are shown)."""
    service = SyncService(settings, cluster=cluster)
    await service.refresh()
    return service.status()


SYNC = web.AppKey("olmd_sync", SyncService)


async def sync_component(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: ``app[SYNC]`` and the nightly scheduler, while the daemon runs.

    Uses a service already at ``app[SYNC]`` (tests put one with fake clocks there),
    else makes one whose metrics join the runtime's registry and which takes the sync
    lease through ``app[CLUSTER]`` when the cluster is on. Registers a reload hook
    (new settings for the service and the schedule) and a liveness check (the scheduler
    is running). On the way out: scheduler first, then a running sync is stopped with
    its manifest written.
    """
    runtime = app[RUNTIME]
    cluster = app.get(CLUSTER)
    if SYNC not in app:
        metrics = SyncMetrics(runtime.metrics.registry)
        if cluster is not None:  # read at every scrape
            metrics.blocked.set_function(lambda: 0.0 if cluster.connected else 1.0)
        app[SYNC] = SyncService(
            runtime.settings, metrics, cluster=cluster, distributor=app.get(DISTRIBUTION)
        )
    service = app[SYNC]
    scheduler = SyncScheduler(service, runtime.settings)

    async def reload(settings: Settings) -> None:
        await service.reload(settings)
        scheduler.reload(settings)

    await service.open()
    try:
        scheduler.start()
    except BaseException:
        await service.close()
        raise
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
        await service.close()
