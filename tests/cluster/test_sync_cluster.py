"""One sync per window, fleet-wide: two real ``olmd serve`` gateways, a real Redis, emulated
nodes. Each gateway keeps its manifest and state in a folder of its own, as on two machines:
only the Redis lease keeps them from both syncing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.sync.manifest import read_manifest
from tests.cluster.sync_support import (
    MODELS,
    Gateway,
    count_completed_pulls,
    due_now_settings,
    finished,
    metric,
    pull_requests,
    until,
)
from tests.helpers import RedisServer

SAME_STORY = ("state", "last_result", "manifest")


def node(name: str, **pull: float) -> Emulator:
    return Emulator(EmulatorConfig(name=name, models=[], **pull))  # type: ignore[arg-type]


def pair(tmp_path: Path, nodes: list[Emulator], redis: RedisServer) -> tuple[Gateway, Gateway]:
    return tuple(  # type: ignore[return-value]
        Gateway(tmp_path, due_now_settings(name, nodes, tmp_path / name), redis.url)
        for name in ("gw-a", "gw-b")
    )


async def test_both_schedulers_due_one_sync_runs_and_both_tell_it(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with (
        node("n1", pull_size=1_000_000, pull_speed=2_000_000) as n1,
        node("n2", pull_size=1_000_000, pull_speed=2_000_000) as n2,
    ):
        done = count_completed_pulls(n1, n2)
        a, b = pair(tmp_path, [n1, n2], redis_server)
        try:
            await asyncio.gather(a.start(), b.start())  # both catch up at start
            async with aiohttp.ClientSession() as http:

                async def both_done() -> bool:
                    return all([finished(await g.sync(http)) for g in (a, b)])

                await until(both_done, 15, "the sync to finish on both gateways")
                await asyncio.sleep(2.5)  # more than a retry interval: nobody runs again
                status_a, status_b = await a.sync(http), await b.sync(http)
                metrics_a, metrics_b = await a.metrics(http), await b.metrics(http)
        finally:
            await asyncio.gather(a.stop(), b.stop())
    assert done == {(n, m): 1 for n in ("n1", "n2") for m in MODELS}
    assert pull_requests(n1) == pull_requests(n2) == len(MODELS)
    runner = status_a["cluster"]["last_run_by"]
    assert runner in ("gw-a", "gw-b") and status_b["cluster"]["last_run_by"] == runner
    written = [g for g in (a, b) if g.manifest.exists()]
    assert [g.name for g in written] == [runner]  # one manifest
    manifest = read_manifest(written[0].manifest)
    assert manifest is not None and manifest.fence == 1 and manifest.gateway == runner
    for key in SAME_STORY:
        assert status_a[key] == status_b[key], key
    assert status_a["state"]["fence"] == 1 and status_a["state"]["gateway"] == runner
    assert status_a["manifest"]["gateway"] == runner
    assert status_a["last_result"]["counts"] == {"pulled": 4}
    for name in ("olmd_sync_last_run_timestamp_seconds", 'olmd_sync_models_present{node="n1"}'):
        assert metric(metrics_a, name) == metric(metrics_b, name) is not None, name
    assert metric(metrics_b, 'olmd_sync_models_present{node="n2"}') == 2
    refused = [e for g in (a, b) for e in g.events() if e.get("event") == "sync.refused"]
    assert refused and all(
        "holds the sync lease" in e["reason"] or "already ran" in e["reason"] for e in refused
    )


async def test_a_gateway_killed_mid_sync_is_replaced_and_its_restart_writes_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # 1.5 s per pull, two at once: the first model on both nodes, then the second.
    slow = {"pull_size": 1_500_000, "pull_speed": 1_000_000}
    async with node("n1", **slow) as n1, node("n2", **slow) as n2:
        done = count_completed_pulls(n1, n2)
        a, b = pair(tmp_path, [n1, n2], redis_server)
        try:
            await a.start()  # alone first: it takes the lease
            await until(lambda: n1.state.stats.pulls_in_flight, 10, "a's first pulls")
            await b.start()
            first = [(n, MODELS[0]) for n in ("n1", "n2")]
            await until(
                lambda: all(done[k] for k in first) and n1.state.stats.pulls_in_flight,
                10,
                "a to finish the first model and start the second",
            )
            a.kill()
            await a.proc.wait()  # type: ignore[union-attr]
            killed_state = (a.manifest.parent / "manifest.state.json").read_bytes()
            async with aiohttp.ClientSession() as http:
                status = await until(
                    lambda: _finished_status(b, http), 15, "b to take over and finish"
                )
                await a.start()  # with its old state: a run of fence 1, "running"
                await asyncio.sleep(2.5)  # its catch-up and a retry interval
                status_a = await a.sync(http)
                status_b = await b.sync(http)
        finally:
            await asyncio.gather(a.stop(), b.stop())
    assert done == {(n, m): 1 for n in ("n1", "n2") for m in MODELS}
    # The second model was pulled twice on each node (a's cut pull, b's), the first once.
    assert pull_requests(n1) == pull_requests(n2) == 3
    assert status["state"]["fence"] == 2 and status["state"]["gateway"] == "gw-b"
    result = status["last_result"]
    assert result["options"]["skip_existing"] is True  # the takeover picks up
    assert {(o["node"], o["model"]): o["status"] for o in result["outcomes"]} == {
        **{(n, MODELS[0]): "skipped" for n in ("n1", "n2")},
        **{(n, MODELS[1]): "pulled" for n in ("n1", "n2")},
    }
    assert any(e.get("event") == "sync.takeover" for e in b.events())
    manifest = read_manifest(b.manifest)
    assert manifest is not None and manifest.fence == 2 and manifest.gateway == "gw-b"
    # The killed gateway, restarted, wrote nothing: no manifest, its state file as it was.
    assert not a.manifest.exists()
    assert (a.manifest.parent / "manifest.state.json").read_bytes() == killed_state
    assert json.loads(killed_state)["fence"] == 1
    for key in SAME_STORY:
        assert status_a[key] == status_b[key], key
    assert not any(e.get("event") == "sync.started" for e in _since_restart(a))


async def test_redis_down_no_sync_starts_and_it_resumes_when_redis_returns(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    await redis_server.stop()
    async with node("n1", pull_size=200_000) as n1, node("n2", pull_size=200_000) as n2:
        done = count_completed_pulls(n1, n2)
        a, b = pair(tmp_path, [n1, n2], redis_server)
        try:
            await asyncio.gather(a.start(), b.start())
            async with aiohttp.ClientSession() as http:

                async def both_blocked() -> bool:
                    statuses = [await g.sync(http) for g in (a, b)]
                    return all((s["refused"] or {}).get("blocked") for s in statuses)

                await until(both_blocked, 10, "both catch-ups to be refused")
                statuses = [await g.sync(http) for g in (a, b)]
                metrics = [await g.metrics(http) for g in (a, b)]
                assert pull_requests(n1) == pull_requests(n2) == 0
                await redis_server.start()

                async def both_done() -> bool:
                    return all([finished(await g.sync(http)) for g in (a, b)])

                await until(both_done, 15, "the sync to run once Redis is back")
                after = await a.sync(http)
        finally:
            await asyncio.gather(a.stop(), b.stop())
    for status in statuses:
        assert not status["running"]
        assert "Redis does not answer" in status["blocked"]
        assert "Redis does not answer" in status["refused"]["reason"]
        assert status["cluster"]["connected"] is False
    for text in metrics:
        assert metric(text, "olmd_cluster_connected") == 0
        assert metric(text, "olmd_sync_blocked") == 1
        assert metric(text, "olmd_sync_running") == 0
    assert after["blocked"] is None and after["cluster"]["connected"] is True
    assert done == {(n, m): 1 for n in ("n1", "n2") for m in MODELS}
    assert len([g for g in (a, b) if g.manifest.exists()]) == 1


async def _finished_status(gateway: Gateway, http: aiohttp.ClientSession) -> dict | None:
    status = await gateway.sync(http)
    return status if finished(status) and status["state"].get("fence") == 2 else None


def _since_restart(gateway: Gateway) -> list[dict]:
    events = gateway.events()
    starts = [i for i, e in enumerate(events) if e.get("event") == "listening"]
    return events[starts[-1] :] if starts else events
