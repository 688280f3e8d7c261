"""Two gateways (real olmd processes) over one fleet, sharing state through a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.cluster.support import gateway, metric
from tests.helpers import RedisServer, free_port, settings_dict

MODEL = "llama3.1:8b"
BODY = {"model": MODEL, "prompt": "hi", "stream": False}


def fleet(*emulators: Emulator, **routing: Any) -> dict[str, Any]:
    data = settings_dict([(e.state.config.name, 1, e) for e in emulators], **routing)
    data["cluster"] = {"publish_interval": 0.1, "peer_timeout": 2.0}
    return data


@contextlib.asynccontextmanager
async def two_nodes(**config: Any) -> AsyncIterator[tuple[Emulator, Emulator]]:
    """Emulated nodes n1 and n2, holding the model."""
    async with (
        Emulator(EmulatorConfig(name="n1", models=[MODEL], **config)) as n1,
        Emulator(EmulatorConfig(name="n2", models=[MODEL], **config)) as n2,
    ):
        yield n1, n2


@contextlib.asynccontextmanager
async def two_gateways(
    tmp_path: Path, redis_url: str, data: dict[str, Any]
) -> AsyncIterator[tuple[str, str]]:
    """Gateways gw-a and gw-b (processes) with the same settings but their ports."""
    b_data = {**data, "server": {**data["server"], "port": free_port()}}
    async with (
        gateway(tmp_path, "gw-a", data, redis_url) as a,
        gateway(tmp_path, "gw-b", b_data, redis_url) as b,
    ):
        yield a, b


async def generate(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str]:
    async with http.post(url + "/api/generate", json=BODY, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Olmd-Node", "")


async def test_a_node_ejected_through_one_gateway_is_skipped_by_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_nodes() as (n1, n2):
        # Long probe intervals: only the other gateway's word can take n1 out of B.
        data = fleet(n1, n2, failures_to_eject=1, cooldown=30, probe_interval=30)
        async with (
            two_gateways(tmp_path, redis_server.url, data) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            assert {(await generate(http, b))[1] for _ in range(4)} == {"n1", "n2"}
            n1.state.update({"fault": "http500", "fault_count": 1})
            assert await generate(http, a) == (200, "n2")  # n1 failed, a ejected it
            ejected = time.monotonic()
            await asyncio.sleep(1.0)
            served = [(await generate(http, b)) for _ in range(10)]
            assert served == [(200, "n2")] * 10, served
            assert time.monotonic() - ejected < 5  # all well within B's own probe interval


async def test_two_gateways_share_the_slots_of_two_single_slot_nodes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # The emulators count generations running at once (num_parallel above what olmd
    # sends, so nothing waits there): a slot is free again before the last chunk goes,
    # as in Ollama, so the count is not inflated by a request ending as the next begins.
    async with two_nodes(tokens=10, token_delay=0.03, num_parallel=4) as (n1, n2):
        data = fleet(n1, n2, parallel=1, queue_timeout=20)
        async with (
            two_gateways(tmp_path, redis_server.url, data) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            await asyncio.sleep(0.3)  # both gateways have published once

            async def user(url: str) -> list[int]:
                return [(await generate(http, url))[0] for _ in range(8)]

            statuses = await asyncio.gather(user(a), user(a), user(b), user(b))
        most = max(max(n.state.stats.max_slots_in_use.values(), default=0) for n in (n1, n2))
        print(f"most requests one single-slot node held at once: {most}")
        assert [s for run in statuses for s in run] == [200] * 32
        assert most <= 2


async def test_redis_going_away_costs_no_request_and_sharing_comes_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_nodes() as (n1, n2):
        data = fleet(n1, n2, strategy="adaptive")
        data["cluster"]["redis_timeout"] = 0.3
        async with (
            two_gateways(tmp_path, redis_server.url, data) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            assert await metric(http, a, "olmd_cluster_connected") == 1
            await redis_server.stop()
            stop_at = time.monotonic() + 3.0
            outcomes: Counter[int] = Counter()

            async def client(url: str) -> None:
                while time.monotonic() < stop_at:
                    outcomes[(await generate(http, url))[0]] += 1

            await asyncio.gather(*(client(a if i % 2 else b) for i in range(16)))
            assert set(outcomes) == {200} and outcomes[200] > 50, outcomes
            for url in (a, b):
                assert await metric(http, url, "olmd_cluster_connected") == 0
            await redis_server.start()

            async def connected() -> bool:
                return all([await metric(http, u, "olmd_cluster_connected") == 1 for u in (a, b)])

            deadline = time.monotonic() + 10
            while not await connected():
                assert time.monotonic() < deadline, "the gateways did not reconnect"
                await asyncio.sleep(0.1)
            # Sharing works again: a session pinned through A is found by B.
            node = (await generate(http, a, **{"X-Olmd-Session": "after-outage"}))[1]
            await asyncio.sleep(0.5)
            served = {(await generate(http, b, **{"X-Olmd-Session": "after-outage"}))[1]}
            assert served == {node}


async def test_a_session_pinned_through_one_gateway_is_found_by_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with two_nodes() as (n1, n2):
        data = fleet(n1, n2, strategy="adaptive")
        async with (
            two_gateways(tmp_path, redis_server.url, data) as (a, b),
            aiohttp.ClientSession() as http,
        ):
            pinned = {}
            for user in range(6):
                pinned[user] = (await generate(http, a, **{"X-Olmd-Session": f"user-{user}"}))[1]
            await asyncio.sleep(0.5)
            for user in range(6):
                status, node = await generate(http, b, **{"X-Olmd-Session": f"user-{user}"})
                assert (status, node) == (200, pinned[user])
