"""A sync that lost its lease writes nothing over its successor's: the fencing number, on a
real redis-server, with the sync service in-process (a fake wall clock inside the window)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.cluster.lease import Lease, lease_key
from daemon.cluster.record import SharedRecord
from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.settings import Settings
from daemon.sync.claim import FencedOut, take_claim
from daemon.sync.manifest import Manifest, read_manifest, write_manifest
from daemon.sync.service import SyncOptions, SyncService
from daemon.sync.shared import read_view
from daemon.sync.state import read_state, state_path
from tests.helpers import RedisServer
from tests.sync.support import IN_WINDOW, FakeNow, make_settings

MODELS = ["llama3.1:8b", "qwen3:8b"]


def clustered(settings: Settings, name: str, url: str, **cluster: float) -> Settings:
    data = settings.model_dump(mode="json", include={"services", "jobs"})
    return Settings(**data, cluster={"enabled": True, "name": name, **cluster}, OLMD_REDIS_URL=url)


async def test_a_run_whose_lease_is_taken_stops_and_keeps_the_newer_manifest(
    tmp_path: Path, redis_server: RedisServer, clusters
) -> None:
    cluster_a, cluster_b = clusters
    slow = EmulatorConfig(name="n1", models=[], pull_size=20_000_000, pull_speed=2_000_000)
    async with Emulator(slow) as emu:
        base = make_settings(
            tmp_path / "a", [("n1", emu)], models=MODELS, fallback=[],
            download={"max_parallel_jobs": 1},
        )  # fmt: skip
        settings = clustered(base, "gw-a", redis_server.url, lease_seconds=1.2)
        service = SyncService(settings, now=FakeNow(IN_WINDOW), cluster=cluster_a)
        await service.open()
        try:
            assert await service.start(SyncOptions(), trigger="schedule")
            for _ in range(200):
                if emu.state.stats.pulls_in_flight:
                    break
                await asyncio.sleep(0.02)
            # gw-a "paused" past its lease: gw-b took it over and wrote its manifest.
            await cluster_b.call(lambda r: r.delete(lease_key(cluster_b, "sync")))
            successor = await Lease.acquire(cluster_b, "sync", seconds=30)
            assert successor.fence == 2
            theirs = Manifest(generated_at=datetime.now(UTC), window="w", fence=2, gateway="gw-b")
            await SharedRecord(cluster_b, "sync").write(
                2, {"gateway": "gw-b", "manifest": theirs.model_dump_json(), "running": "1"}
            )
            async with asyncio.timeout(10):
                await service.wait()
            status = service.status()
        finally:
            await service.stop()
            await service.close()
        view = await read_view(cluster_b)
        copy = await SharedRecord(cluster_b, "sync").read(["manifest"])
        await successor.close()
    # It stopped: the running pull was cut, the second model never started.
    assert emu.state.stats.requests["/api/pull"] == 1
    assert "llama3.1:8b" not in emu.state.config.models
    # It wrote no manifest: not the file, not the shared copy, not the shared record.
    assert not settings.jobs.ollama_sync.manifest_path.exists()
    assert json.loads(copy["manifest"])["gateway"] == "gw-b"
    assert view.fence == 2 and view.gateway == "gw-b" and view.running
    assert "fence 2" in status["last_error"] and status["last_result"] is None
    local = read_state(state_path(settings.jobs.ollama_sync.manifest_path))
    assert local.fence == 1 and local.last_outcome == "running"  # as far as it got


async def test_the_manifest_file_guards_itself_when_redis_cannot_say(
    tmp_path: Path, redis_server: RedisServer, clusters
) -> None:
    cluster_a, _ = clusters
    async with Emulator(EmulatorConfig(name="n1", models=[])) as emu:
        base = make_settings(tmp_path, [("n1", emu)], models=MODELS, fallback=[])
        settings = clustered(base, "gw-a", redis_server.url)
        path = settings.jobs.ollama_sync.manifest_path
        older = Manifest(generated_at=datetime.now(UTC), window="w", fence=7, gateway="gw-c")
        write_manifest(path, older)
        # A fresh Redis issues fence 1, but this gateway's file knew 7: the floor lifts it.
        claim = await take_claim(settings, cluster_a)
        assert claim.fence == 8
        # Meanwhile a newer run on shared storage wrote fence 9, and Redis went away.
        newer = older.model_copy(update={"fence": 9, "gateway": "gw-d"})
        write_manifest(path, newer)
        await redis_server.stop()
        ours = Manifest(generated_at=datetime.now(UTC), window="w")
        with pytest.raises(FencedOut, match="fence 9"):
            await claim.save_manifest(ours)
        await claim.release()
    kept = read_manifest(path)
    assert kept is not None and kept.fence == 9 and kept.gateway == "gw-d"
    assert not claim.lock.held


def test_a_takeover_skips_what_an_unfinished_run_of_this_window_pulled(tmp_path: Path) -> None:
    from datetime import timedelta

    from daemon.sync.claim import Claim
    from daemon.sync.shared import RunView
    from daemon.sync.state import SyncLock, SyncState

    settings = make_settings(tmp_path, [], models=MODELS, fallback=[])
    now = IN_WINDOW + timedelta(minutes=30)
    full = SyncOptions().model_dump(mode="json")

    def resumed(
        trigger: str = "catch-up", asked: SyncOptions | None = None, ran=full, **view
    ) -> bool:
        claim = Claim(settings, SyncLock(tmp_path / "lock"), view=RunView(options=ran, **view))
        return claim.resume(asked or SyncOptions(), trigger, now).skip_existing

    cut = SyncState(last_started_at=IN_WINDOW, last_outcome="running", fence=3)
    assert resumed(state=cut, running=True, fence=3)  # its holder died
    stopped = cut.model_copy(update={"last_outcome": "failed"})
    assert resumed(state=stopped, fence=3)  # stopped, or lost its lease
    done = stopped.model_copy(update={"last_full_started_at": IN_WINDOW})
    assert not resumed(state=done, fence=3)  # ran to its end: nothing to resume
    yesterday = cut.model_copy(update={"last_started_at": IN_WINDOW - timedelta(days=1)})
    assert not resumed(state=yesterday, fence=3)
    narrow = SyncOptions(models=("qwen3:8b",)).model_dump(mode="json")
    assert not resumed(state=cut, ran=narrow, fence=3)  # a narrowed run is no window's sync
    assert not resumed("api", state=cut, fence=3)  # a person's options stand
    assert not resumed(asked=SyncOptions(host="x"), state=cut, fence=3)
