"""Fair queueing end to end: emulated nodes, olmd with tenants, real keyed clients.

Interactive requests overtake a batch backlog; batch tenants share slots by weight;
the headroom kept for interactive work is given back when interactive traffic stops.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL
from tests.helpers import eventually, running_olmd
from tests.tenancy.support import api_keys, generate, nodes, tenant_settings


@pytest.fixture(autouse=True)
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLMD_API_KEYS", api_keys("chat", "batch", "batch2"))


TENANTS = [
    {"name": "chat", "priority": "interactive"},
    {"name": "batch", "priority": "batch", "weight": 2},
    {"name": "batch2", "priority": "batch", "weight": 1},
]


async def test_an_interactive_request_overtakes_a_batch_backlog() -> None:
    async with (
        nodes(1, token_delay=0.004) as emus,
        running_olmd(tenant_settings(emus, TENANTS)) as s,
    ):
        url = str(s.make_url("")).rstrip("/")
        done: list[str] = []

        async def one(tenant: str, tokens: int) -> None:
            status, _, _ = await generate(http, url, tenant, tokens=tokens)
            assert status == 200
            done.append(tenant)

        async with aiohttp.ClientSession() as http:
            blocker = asyncio.create_task(one("batch", 40))  # holds the only slot ~0.16 s
            await eventually(lambda: s.app[GATEWAY].fleet.get("n0").busy.get(MODEL) == 1)
            backlog = [asyncio.create_task(one("batch", 2)) for _ in range(12)]
            await eventually(lambda: s.app[GATEWAY].router.queued == 12)
            await one("chat", 2)
            await asyncio.gather(blocker, *backlog)
    # The chat turn came right after the request holding the slot, before the backlog.
    assert done.index("chat") == 1, done


async def test_batch_tenants_share_slots_by_weight() -> None:
    async with (
        nodes(1, token_delay=0.004) as emus,
        running_olmd(tenant_settings(emus, TENANTS)) as s,
    ):
        url = str(s.make_url("")).rstrip("/")
        order: list[str] = []

        async def one(tenant: str, tokens: int) -> None:
            status, _, _ = await generate(http, url, tenant, tokens=tokens)
            assert status == 200
            order.append(tenant)

        async with aiohttp.ClientSession() as http:
            blocker = asyncio.create_task(one("chat", 40))
            await eventually(lambda: s.app[GATEWAY].fleet.get("n0").busy.get(MODEL) == 1)
            # Both backlogs full before the slot frees: 45 each, the first 60 counted.
            tasks = [asyncio.create_task(one(t, 1)) for _ in range(45) for t in ("batch2", "batch")]
            await eventually(lambda: s.app[GATEWAY].router.queued == 90, timeout=10)
            await asyncio.gather(blocker, *tasks)
    first = Counter(order[1:61])
    print("first 60 completions:", dict(first))
    assert 36 <= first["batch"] <= 44 and first["batch"] + first["batch2"] == 60


async def test_headroom_is_kept_for_people_and_released_when_they_stop() -> None:
    async with nodes(1, num_parallel=2, token_delay=0.01) as emus:
        settings = tenant_settings(
            emus, TENANTS, parallel=2, interactive_window=0.6, interactive_reserve=1
        )
        async with running_olmd(settings) as s, aiohttp.ClientSession() as http:
            url = str(s.make_url("")).rstrip("/")
            node = s.app[GATEWAY].fleet.get("n0")
            seen: list[int] = []
            stop = asyncio.Event()

            async def watch() -> None:
                while not stop.is_set():
                    seen.append(node.busy.get(MODEL, 0))
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            assert (await generate(http, url, "chat"))[0] == 200  # people are here
            batch = [
                asyncio.create_task(generate(http, url, "batch", tokens=10)) for _ in range(20)
            ]
            await asyncio.sleep(0.3)  # inside the window: one slot is kept free
            during = max(seen)
            assert (await generate(http, url, "chat"))[0] == 200  # finds it at once
            await asyncio.sleep(1.0)  # no more people: the window closes
            seen.clear()
            await eventually(lambda: node.busy.get(MODEL, 0) == 2, timeout=3)
            results = await asyncio.gather(*batch)
            stop.set()
            await watcher
    assert during == 1  # batch alone never took the second slot while people were around
    assert all(status == 200 for status, _, _ in results)
