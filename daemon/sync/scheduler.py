"""The nightly sync on a schedule: APScheduler 3's ``AsyncIOScheduler`` in the daemon's loop.

``jobs.ollama_sync.schedule_cron`` is read in the download window's zone (settings refuse
a cron time outside the window). Catch-up: a daemon that starts inside a window whose
scheduled time has passed, with no completed full sync started in that window, starts
one at once; outside the window it waits for the next scheduled time. "Completed" comes
from the state file next to the manifest, so it survives restarts and counts CLI runs.

A scheduled run refused because another run held the slot (a narrowed CLI run, a dry
run) is not lost: every few minutes the same catch-up rule is checked again, and while
the window is open and no full sync has started in it, one is started.

With the cluster on, every gateway's scheduler fires and the sync lease lets one run:
the others' catch-up rule reads the fleet's last run (the shared record), and the check
comes every ``lease_seconds`` (a gateway that died mid-sync is replaced soon after its
lease runs out; a Redis that comes back is noticed as soon). Each start also names the
time it is for (``unless_ran_since``): under the lease, a run for a time that a full
run on another gateway already covered is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from daemon.logs import get_logger
from daemon.settings import Settings
from daemon.sync.plan import SyncOptions
from daemon.sync.state import SyncState
from daemon.window import AllowedWindow

__all__ = [
    "JOB_ID",
    "RETRY_JOB_ID",
    "SyncScheduler",
    "SyncStarter",
    "cron_trigger",
    "latest_due",
    "missed_run",
    "retry_seconds",
]

log = get_logger("olmd.scheduler")

JOB_ID = "ollama_sync"
CATCH_UP_JOB_ID = "ollama_sync_catch_up"
RETRY_JOB_ID = "ollama_sync_retry"
RETRY_SECONDS = 300  # how often a missed (refused) run of the open window is looked for
# A fire time the loop noticed late (a suspended VM, a blocked loop) still runs within
# this many seconds; later ones are dropped, and the window check guards the rest.
_MISFIRE_GRACE = 600


class SyncStarter(Protocol):
    """What the scheduler needs of the sync service (``daemon.sync.service.SyncService``)."""

    async def start(
        self,
        options: SyncOptions | None = None,
        *,
        trigger: str = ...,
        unless_ran_since: datetime | None = ...,
    ) -> bool:
        """Start a run; False if one is already running (or, with ``unless_ran_since``,
        a full run that started at or after it already ran, on any gateway)."""
        ...

    def state(self) -> SyncState:
        """The last run, from the state file."""
        ...

    @property
    def refusal(self) -> Mapping[str, Any] | None:
        """The last refused start: ``reason`` says why."""
        ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


def cron_trigger(settings: Settings) -> CronTrigger:
    """The nightly job's trigger: the cron expression read in the window's zone."""
    window = settings.services.ollama.download.allowed_window
    return CronTrigger.from_crontab(settings.jobs.ollama_sync.schedule_cron, timezone=window.tz)


def retry_seconds(settings: Settings) -> float:
    """How often the periodic job looks for a missed run of the open window."""
    if settings.cluster.enabled:
        return min(RETRY_SECONDS, settings.cluster.lease_seconds)
    return RETRY_SECONDS


def latest_due(window: AllowedWindow, trigger: CronTrigger, now: datetime) -> datetime | None:
    """The latest scheduled time in the window open at ``now`` that is not after it."""
    opening = window.opening_for(now)
    if opening is None:
        return None
    due: datetime | None = None
    at: datetime | None = trigger.get_next_fire_time(None, opening)
    for _ in range(100_000):  # bounded: a cron every minute of a day is 1 440 times
        if at is None or at > now:
            break
        due = at
        at = trigger.get_next_fire_time(at, at + timedelta(seconds=1))
    return due


def missed_run(
    window: AllowedWindow, trigger: CronTrigger, state: SyncState, now: datetime
) -> datetime | None:
    """The scheduled time a daemon starting at ``now`` missed and should make up at once.

    None when ``now`` is outside the window, when the window's scheduled time is still
    ahead (the job will run it), or when a full sync that started in this window already
    ran to its end.
    """
    opening = window.opening_for(now)
    if opening is None:
        return None
    due: datetime | None = trigger.get_next_fire_time(None, opening)
    if due is None or due >= now:
        return None
    done = state.last_full_started_at
    if done is not None and done >= opening:
        return None
    return due


class SyncScheduler:
    """Owns the APScheduler instance; start it inside the daemon's running loop.

    ``now`` is the wall clock the window and catch-up decisions read (tests pass a
    fake); APScheduler itself keeps real time for when jobs fire.
    """

    def __init__(
        self, service: SyncStarter, settings: Settings, *, now: Callable[[], datetime] = _utcnow
    ) -> None:
        self._service = service
        self._settings = settings
        self._now = now
        self._scheduler: AsyncIOScheduler | None = None

    def start(self) -> None:
        """Start the scheduler, add the nightly job, and catch up if a run was missed."""
        window = self._settings.services.ollama.download.allowed_window
        scheduler = AsyncIOScheduler(
            event_loop=asyncio.get_running_loop(),
            timezone=window.tz,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": _MISFIRE_GRACE,
            },
        )
        scheduler.start()
        self._scheduler = scheduler
        self._schedule(self._settings)
        missed = self._missed()
        if missed is not None:
            log.info("sync.catch_up", missed=missed.astimezone(window.tz).isoformat())
            # No trigger: APScheduler runs it at once, as a job it owns.
            scheduler.add_job(
                self.fire, id=CATCH_UP_JOB_ID, kwargs={"trigger": "catch-up"},
                replace_existing=True,
            )  # fmt: skip

    def _missed(self) -> datetime | None:
        job = self._settings.jobs.ollama_sync
        if not job.enabled:
            return None
        window = self._settings.services.ollama.download.allowed_window
        return missed_run(window, cron_trigger(self._settings), self._service.state(), self._now())

    def _schedule(self, settings: Settings) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        for job_id in (JOB_ID, RETRY_JOB_ID):
            if scheduler.get_job(job_id) is not None:
                scheduler.remove_job(job_id)
        job = settings.jobs.ollama_sync
        if not job.enabled:
            log.info("sync.schedule_disabled")
            return
        every = IntervalTrigger(seconds=retry_seconds(settings))
        scheduler.add_job(self.retry, every, id=RETRY_JOB_ID)
        added = scheduler.add_job(
            self.fire, cron_trigger(settings), id=JOB_ID, kwargs={"trigger": "schedule"}
        )
        log.info(
            "sync.scheduled",
            cron=job.schedule_cron,
            window=str(settings.services.ollama.download.allowed_window),
            next_run=added.next_run_time.isoformat() if added.next_run_time else None,
        )

    def reload(self, settings: Settings) -> None:
        """Adopt new settings: the job is rescheduled from the new cron and window."""
        self._settings = settings
        self._schedule(settings)

    def next_run_time(self) -> datetime | None:
        """When the nightly job fires next (aware, in the window's zone); None if off."""
        job = self._scheduler.get_job(JOB_ID) if self._scheduler is not None else None
        return job.next_run_time if job is not None else None

    def alive(self) -> bool:
        """For the watchdog: the scheduler is running."""
        return self._scheduler is not None and bool(self._scheduler.running)

    async def fire(self, trigger: str = "schedule") -> bool:
        """The job: start a full sync if ``now`` is inside the window. False if it did not
        start (outside the window, or a sync is already running)."""
        window = self._settings.services.ollama.download.allowed_window
        now = self._now()
        if not window.contains(now):
            # Settings keep the cron inside the window; a DST change can still move it out.
            log.warning("sync.schedule_skipped", trigger=trigger, reason=f"outside {window}")
            return False
        if trigger == "catch-up":
            since = window.opening_for(now)
        else:
            since = latest_due(window, cron_trigger(self._settings), now) or now
        started = await self._service.start(SyncOptions(), trigger=trigger, unless_ran_since=since)
        if not started:
            log.warning("sync.schedule_refused", trigger=trigger, reason=self._refused_why())
        return started

    def _refused_why(self) -> str:
        return str((self._service.refusal or {}).get("reason") or "a sync is running")

    async def retry(self) -> bool:
        """The periodic job: start the window's sync if it is due and none has started
        in it (the scheduled one was refused, say). True if one started."""
        missed = self._missed()
        if missed is None:
            return False
        window = self._settings.services.ollama.download.allowed_window
        started = await self._service.start(
            SyncOptions(), trigger="catch-up", unless_ran_since=window.opening_for(self._now())
        )
        if started:
            log.info("sync.catch_up", missed=missed.astimezone(window.tz).isoformat(),
                     reason="retry")  # fmt: skip
        else:
            log.debug("sync.catch_up_refused", reason=self._refused_why())
        return started

    async def shutdown(self) -> None:
        """Stop the scheduler; a job in progress is cancelled (the sync itself belongs to
        the service, which stops it)."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is None or not scheduler.running:
            return
        scheduler.shutdown(wait=False)
        # AsyncIOScheduler.shutdown only queues the work on the loop; let it run.
        await asyncio.sleep(0)
