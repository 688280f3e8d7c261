"""Slots learned, not assumed: a node whose ``parallel`` is not set is tried with one
request more while others wait in olmd, and keeps the figure its answers show."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL
from tests.helpers import running_olmd, settings_dict


@pytest.mark.parametrize(("slots", "stream"), [(1, True), (4, False), (4, True)])
async def test_a_node_is_learned_as_the_slots_it_decodes_at_once(slots: int, stream: bool) -> None:
    config = EmulatorConfig(
        name="n0", models=[MODEL], num_parallel=slots, tokens=8, token_delay=0.01
    )
    async with Emulator(config) as node:
        settings = settings_dict([("n0", 1, node)], strategy="adaptive")
        del settings["routing"]["parallel"]  # not set: learned
        async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            body = {"model": MODEL, "prompt": "count to eight", "stream": stream}

            async def client() -> None:
                for _ in range(8):
                    async with http.post(url + "/api/generate", json=body) as resp:
                        assert resp.status == 200
                        await resp.read()

            await asyncio.gather(*(client() for _ in range(8)))
            fleet_node = server.app[GATEWAY].fleet.get("n0")
            assert fleet_node is not None
            assert fleet_node.learned_slots.get(MODEL, 1) == slots
            async with http.get(url + "/admin/nodes") as resp:
                [view] = (await resp.json())["nodes"]
            assert view["slots_configured"] is False and view["slots"] == slots
            assert view["slots_learned"].get(MODEL, 1) == slots
