"""Probing at fleet scale: hundreds of nodes, each on time, with bounded concurrency."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from daemon.emulator.server import EmulatorConfig, create_app
from daemon.gateway.component import GATEWAY
from tests.helpers import eventually, free_port, running_olmd

NODES = 200


@pytest.fixture
async def many_ports() -> AsyncIterator[list[int]]:
    """One emulator application listening on 200 ports: 200 nodes as olmd sees them."""
    runner = web.AppRunner(create_app(EmulatorConfig(models=["llama3.1:8b"])), access_log=None)
    await runner.setup()
    for _ in range(NODES):
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    ports = [int(address[1]) for address in runner.addresses]
    yield ports
    await runner.cleanup()


async def test_hundreds_of_nodes_are_probed_on_time(many_ports: list[int]) -> None:
    data = {
        "server": {"host": "127.0.0.1", "port": free_port()},
        "routing": {"probe_interval": 1.0, "probe_concurrency": 32},
        "services": {
            "ollama": {
                "health_timeout": 5.0,
                "nodes": [
                    {"name": f"n{i:03}", "host": "127.0.0.1", "port": port}
                    for i, port in enumerate(many_ports)
                ],
            }
        },
        "jobs": {"ollama_sync": {"enabled": False}},
    }
    async with running_olmd(data) as server:
        fleet = server.app[GATEWAY].fleet
        # The first round, at start-up, reached every node.
        assert all(node.probed_at is not None and node.models for node in fleet)
        started = time.monotonic()

        def every_node_probed_since_start() -> bool:
            return all(node.probed_at is not None and node.probed_at > started for node in fleet)

        # Then every node again within about one interval: nobody waits for a whole batch.
        await eventually(every_node_probed_since_start, timeout=2.5)
        assert time.monotonic() - started < 2.5
