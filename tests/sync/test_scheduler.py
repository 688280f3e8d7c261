"""Tests for daemon.sync.scheduler and the daemon's sync component, with a fake wall clock.

APScheduler keeps real time for when jobs fire; what the tests fake is the clock the
window and catch-up decisions read. Firing "at 03:00" is calling the job at a fake 03:00.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta, timezone
from typing import Any

import pytest
from aiohttp import web
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.metrics import Metrics, SyncMetrics
from daemon.runtime import RUNTIME, Runtime
from daemon.settings import Settings, SettingsError, load_settings
from daemon.sync.scheduler import (
    RETRY_JOB_ID,
    RETRY_SECONDS,
    SyncScheduler,
    cron_trigger,
    missed_run,
)
from daemon.sync.service import SYNC, SyncBusy, SyncOptions, SyncService, run_sync, sync_component
from daemon.sync.state import SyncState
from daemon.window import AllowedWindow
from tests.sync.support import FakeNow, make_settings

UTC8 = timezone(timedelta(hours=8))
WINDOW = AllowedWindow.parse("02:00-06:00 UTC+8")
THREE = cron_trigger(Settings())  # the defaults: "0 3 * * *" in "02:00-06:00 UTC+8"


@pytest.fixture(autouse=True)
def _captured_logs() -> Iterator[None]:
    """Log events go to a list, not to a stream an earlier test's CLI run configured
    (and pytest has since closed)."""
    with capture_logs():
        yield


def local(hour: int, minute: int = 0, day: int = 10) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=UTC8)


@pytest.fixture
async def node():
    async with Emulator(EmulatorConfig(models=[], pull_size=20_000)) as emu:
        yield emu


async def wait_for(predicate: Any, seconds: float = 3.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


# -- the cron, read in the window's zone ------------------------------------------------


def test_the_cron_is_read_in_the_windows_zone():
    fire = THREE.get_next_fire_time(None, local(1, 0))
    assert fire == local(3, 0)
    assert fire.astimezone(UTC) == datetime(2024, 3, 9, 19, 0, tzinfo=UTC)


def test_a_cron_time_outside_the_window_is_a_settings_error(tmp_path):
    path = tmp_path / "settings.toml"
    path.write_text('[jobs.ollama_sync]\nschedule_cron = "30 6 * * *"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings(path, env_file=None)
    (problem,) = caught.value.problems
    assert "jobs.ollama_sync.schedule_cron '30 6 * * *' fires at 06:30" in problem
    assert "allowed_window '02:00-06:00 UTC+8'" in problem
    # Every time of day it fires must be inside, and a disabled job is not checked.
    path.write_text('[jobs.ollama_sync]\nschedule_cron = "0 3,7 * * *"\n')
    with pytest.raises(SettingsError, match="fires at 07:00"):
        load_settings(path, env_file=None)
    path.write_text('[jobs.ollama_sync]\nschedule_cron = "0 7 * * *"\nenabled = false\n')
    assert load_settings(path, env_file=None).jobs.ollama_sync.enabled is False
    path.write_text(
        '[services.ollama.download]\nallowed_window = "22:00-04:00 Europe/Berlin"\n'
        '[jobs.ollama_sync]\nschedule_cron = "*/30 22-23,0-3 * * *"\n'
    )
    assert load_settings(path, env_file=None).jobs.ollama_sync.schedule_cron


# -- catch-up ---------------------------------------------------------------------------


def test_missed_run_rules():
    nothing = SyncState()
    assert missed_run(WINDOW, THREE, nothing, local(4, 0)) == local(3, 0)  # catch up
    assert missed_run(WINDOW, THREE, nothing, local(2, 30)) is None  # 03:00 still ahead
    assert missed_run(WINDOW, THREE, nothing, local(3, 0)) is None  # the job itself runs
    assert missed_run(WINDOW, THREE, nothing, local(7, 0)) is None  # outside: wait
    done_tonight = SyncState(last_full_started_at=local(3, 0))
    assert missed_run(WINDOW, THREE, done_tonight, local(4, 0)) is None
    done_yesterday = SyncState(last_full_started_at=local(3, 0, day=9))
    assert missed_run(WINDOW, THREE, done_yesterday, local(4, 0)) == local(3, 0)


def test_missed_run_in_a_window_that_crosses_midnight():
    window = AllowedWindow.parse("22:00-04:00 UTC")
    trigger = CronTrigger.from_crontab("30 23 * * *", timezone=UTC)
    after_midnight = datetime(2024, 3, 11, 1, 0, tzinfo=UTC)
    assert missed_run(window, trigger, SyncState(), after_midnight) == datetime(
        2024, 3, 10, 23, 30, tzinfo=UTC
    )


# -- the scheduler in the loop ----------------------------------------------------------


async def test_the_0300_run_starts(node, tmp_path):
    settings = make_settings(tmp_path, [("a", node)], models=["llama3.1:8b"], fallback=[])
    service = SyncService(settings, now=FakeNow(local(3, 0)))
    scheduler = SyncScheduler(service, settings, now=FakeNow(local(2, 59)))
    scheduler.start()
    try:
        assert scheduler.alive()
        next_run = scheduler.next_run_time()
        assert next_run is not None
        assert next_run.astimezone(UTC8).time() == time(3, 0)
        scheduler._now = FakeNow(local(3, 0))  # the job fires at 03:00
        assert await scheduler.fire()
        result = await service.wait()
    finally:
        await scheduler.shutdown()
    assert not scheduler.alive()
    assert result is not None
    assert result.ok
    assert service.status()["trigger"] == "schedule"
    assert node.state.stats.requests["/api/pull"] == 1
    assert service.state().last_full_started_at is not None


async def test_a_start_at_0400_with_no_sync_yet_catches_up(node, tmp_path):
    settings = make_settings(tmp_path, [("a", node)], models=["llama3.1:8b"], fallback=[])
    service = SyncService(settings, now=FakeNow(local(4, 0)))
    scheduler = SyncScheduler(service, settings, now=FakeNow(local(4, 0)))
    with capture_logs() as logs:
        scheduler.start()
        try:
            # APScheduler runs the catch-up job itself, on this loop.
            await wait_for(lambda: service.last_result is not None)
        finally:
            await scheduler.shutdown()
    assert service.status()["trigger"] == "catch-up"
    assert service.last_result is not None
    assert service.last_result.ok
    (event,) = [e for e in logs if e["event"] == "sync.catch_up"]
    assert event["missed"] == "2024-03-10T03:00:00+08:00"
    # A restart later in the same window finds the completed sync and does not repeat it.
    again = SyncScheduler(service, settings, now=FakeNow(local(5, 0)))
    with capture_logs() as logs:
        again.start()
        await asyncio.sleep(0.05)
        await again.shutdown()
    assert not [e for e in logs if e["event"] == "sync.catch_up"]
    assert node.state.stats.requests["/api/pull"] == 1


async def test_a_start_at_0700_does_not_catch_up(node, tmp_path):
    settings = make_settings(tmp_path, [("a", node)], models=["llama3.1:8b"], fallback=[])
    service = SyncService(settings, now=FakeNow(local(7, 0)))
    scheduler = SyncScheduler(service, settings, now=FakeNow(local(7, 0)))
    with capture_logs() as logs:
        scheduler.start()
        await asyncio.sleep(0.05)
        next_run = scheduler.next_run_time()
        await scheduler.shutdown()
    assert not [e for e in logs if e["event"] == "sync.catch_up"]
    assert not service.running
    assert service.last_result is None
    assert next_run is not None
    assert next_run.astimezone(UTC8).time() == time(3, 0)
    assert "/api/pull" not in node.state.stats.requests


async def test_a_second_trigger_while_running_is_refused(tmp_path):
    slow = EmulatorConfig(models=[], pull_size=10_000_000, pull_speed=1_000_000)
    async with Emulator(slow) as emu:
        settings = make_settings(tmp_path, [("a", emu)], models=["llama3.1:8b"], fallback=[])
        service = SyncService(settings, now=FakeNow(local(3, 0)))
        scheduler = SyncScheduler(service, settings, now=FakeNow(local(3, 0)))
        with capture_logs() as logs:
            assert await scheduler.fire()
            assert not await scheduler.fire()
            assert not await service.start(SyncOptions(), trigger="api")
            with pytest.raises(SyncBusy):  # olmd sync at the console
                await run_sync(settings, SyncOptions(), now=FakeNow(local(3, 0)))
            await wait_for(lambda: service.status()["progress"]["phase"] == "pulling")
            await service.stop()
    (refused,) = [e for e in logs if e["event"] == "sync.schedule_refused"]
    assert refused["reason"] == "a sync is already running"
    assert emu.state.stats.requests["/api/pull"] == 1


async def test_a_sync_running_in_another_process_is_refused_too(node, tmp_path):
    from daemon.sync.state import SyncLock, lock_path

    settings = make_settings(tmp_path, [("a", node)])
    service = SyncService(settings, now=FakeNow(local(3, 0)))
    scheduler = SyncScheduler(service, settings, now=FakeNow(local(3, 0)))
    with SyncLock(lock_path(settings.jobs.ollama_sync.manifest_path)):
        assert not await scheduler.fire()
    assert await scheduler.fire()
    await service.wait()


async def test_the_job_does_nothing_outside_the_window(node, tmp_path):
    settings = make_settings(tmp_path, [("a", node)])
    service = SyncService(settings)
    scheduler = SyncScheduler(service, settings, now=FakeNow(local(6, 0)))
    with capture_logs() as logs:
        assert not await scheduler.fire()
    assert logs[-1]["event"] == "sync.schedule_skipped"
    assert not service.running


# -- the daemon's component ---------------------------------------------------------------


async def test_sync_component_runs_the_scheduler_and_follows_reloads(node, tmp_path):
    settings = make_settings(tmp_path, [("a", node)], models=["llama3.1:8b"], fallback=[])
    app = web.Application()
    runtime = Runtime(settings=settings, metrics=Metrics(CollectorRegistry()))
    app[RUNTIME] = runtime
    app.cleanup_ctx.append(sync_component)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        service = app[SYNC]
        assert runtime.alive()
        assert len(runtime.liveness) == 1
        assert runtime.metrics.registry.get_sample_value("olmd_sync_running") == 0
        data = settings.model_dump(mode="json", include={"services", "jobs"})
        data["jobs"]["ollama_sync"]["schedule_cron"] = "0 4 * * *"
        moved = Settings(**data)
        await runtime.apply(moved)
        assert service.settings is moved
        assert await service.start(SyncOptions(ignore_window=True))
    finally:
        await runner.cleanup()  # stops the scheduler, then the sync
    assert runtime.liveness == []
    assert runtime.on_reload == []
    assert not service.running


async def test_a_service_installed_beforehand_is_used(node, tmp_path):
    settings = make_settings(tmp_path, [("a", node)])
    app = web.Application()
    app[RUNTIME] = Runtime(settings=settings, metrics=Metrics(CollectorRegistry()))
    mine = SyncService(settings, SyncMetrics(CollectorRegistry()), now=FakeNow(local(7, 0)))
    app[SYNC] = mine
    app.cleanup_ctx.append(sync_component)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        assert app[SYNC] is mine
    finally:
        await runner.cleanup()


async def test_a_reload_reschedules_the_job(tmp_path):
    settings = make_settings(tmp_path, [], job={"schedule_cron": "0 3 * * *"})
    scheduler = SyncScheduler(SyncService(settings), settings, now=FakeNow(local(7, 0)))
    scheduler.start()
    try:
        data = settings.model_dump(mode="json", include={"services", "jobs"})
        data["jobs"]["ollama_sync"]["schedule_cron"] = "15 4 * * *"
        scheduler.reload(Settings(**data))
        next_run = scheduler.next_run_time()
        assert next_run is not None
        assert next_run.astimezone(UTC8).time() == time(4, 15)
        data["jobs"]["ollama_sync"]["enabled"] = False
        scheduler.reload(Settings(**data))
        assert scheduler.next_run_time() is None
        assert scheduler.alive()
    finally:
        await scheduler.shutdown()


async def test_a_refused_scheduled_run_is_retried_while_the_window_is_open(node, tmp_path):
    from daemon.sync.state import SyncLock, lock_path

    settings = make_settings(tmp_path, [("a", node)], models=["llama3.1:8b"], fallback=[])
    service = SyncService(settings, now=FakeNow(local(3, 0)))
    scheduler = SyncScheduler(service, settings, now=FakeNow(local(2, 59)))
    scheduler.start()
    try:
        assert scheduler._scheduler is not None
        retry_job = scheduler._scheduler.get_job(RETRY_JOB_ID)
        assert retry_job is not None
        assert retry_job.trigger.interval == timedelta(seconds=RETRY_SECONDS)
        assert not await scheduler.retry()  # 02:59: the 03:00 run is not due yet
        # At 03:00 a narrowed `olmd sync --host a` holds the slot: the run is refused.
        scheduler._now = FakeNow(local(3, 0))
        with SyncLock(lock_path(settings.jobs.ollama_sync.manifest_path)):
            assert not await scheduler.fire()
            scheduler._now = FakeNow(local(3, 5))
            assert not await scheduler.retry()  # still held
        scheduler._now = FakeNow(local(3, 10))
        assert await scheduler.retry()  # free again: the window's sync starts
        result = await service.wait()
        assert result is not None and result.ok
        assert service.status()["trigger"] == "catch-up"
        scheduler._now = FakeNow(local(3, 15))
        assert not await scheduler.retry()  # done for this window
        scheduler._now = FakeNow(local(7, 0))
        assert not await scheduler.retry()  # and never outside it
    finally:
        await scheduler.shutdown()
    assert node.state.stats.requests["/api/pull"] == 1
    assert service.state().last_full_started_at is not None


def test_the_latest_due_time_and_the_retry_interval():
    from daemon.sync.scheduler import latest_due, retry_seconds

    every_hour = CronTrigger.from_crontab("0 2-5 * * *", timezone=WINDOW.tz)
    assert latest_due(WINDOW, every_hour, local(4, 30)) == local(4, 0)
    assert latest_due(WINDOW, every_hour, local(4, 0)) == local(4, 0)
    assert latest_due(WINDOW, THREE, local(2, 30)) is None  # 03:00 is still ahead
    assert latest_due(WINDOW, THREE, local(7, 0)) is None  # the window is shut
    assert retry_seconds(Settings()) == RETRY_SECONDS
    # With the cluster on, a gateway that died mid-sync is replaced about a lease later.
    clustered = Settings(cluster={"enabled": True, "lease_seconds": 20}, OLMD_REDIS_URL="redis://x")
    assert retry_seconds(clustered) == 20
