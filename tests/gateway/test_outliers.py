"""Failures the probes cannot see: a node answering 500 to every generation while its
/api/version answers fine is taken out for growing periods and comes back after a good
trial; a model failing on one node takes only that model out there."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL, one_node_app
from tests.helpers import running_olmd, settings_dict

BODY = {"model": MODEL, "prompt": "hi", "stream": False}
FAST = {"probe_interval": 0.1, "cooldown": 0.4, "cooldown_max": 5, "failures_to_eject": 2}


async def served_by(http: aiohttp.ClientSession, url: str, body: dict[str, object]) -> str:
    async with http.post(url + "/api/generate", json=body) as resp:
        await resp.read()
        assert resp.status == 200
        return resp.headers["X-Olmd-Node"]


async def test_a_node_failing_every_generation_stays_out_while_its_probes_pass() -> None:
    bad_config = EmulatorConfig(name="bad", models=[MODEL], fault="http500")
    async with (
        Emulator(bad_config) as bad,
        Emulator(EmulatorConfig(name="good", models=[MODEL])) as good,
    ):
        settings = settings_dict([("bad", 1, bad), ("good", 1, good)], **FAST)
        async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            node = server.app[GATEWAY].fleet.get("bad")
            assert node is not None
            outs: list[float] = []  # how long each ejection lasts
            served: list[str] = []
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline and len(outs) < 3:
                served.append(await served_by(http, url, BODY))  # never the 500: failover
                health = node.model_health.get(MODEL)
                if health is not None and health.total_ejections > len(outs):
                    outs.append(health.ejected_until - time.monotonic())
                    if len(outs) == 1:  # two probes pass meanwhile: it stays out
                        await asyncio.sleep(0.25)
                        assert not node.serves(MODEL, time.monotonic())
                await asyncio.sleep(0.02)
            assert node.health.is_routable(time.monotonic())  # its probes pass all along
            # Each failed trial took it out for longer: base × n.
            assert len(outs) == 3 and outs[0] < outs[1] < outs[2], outs
            assert set(served) == {"good"}
            bad.state.config.fault = "none"  # the node is mended
            health = node.model_health[MODEL]
            await asyncio.sleep(health.cooldown_remaining(time.monotonic()) + 0.05)
            after = {await served_by(http, url, BODY) for _ in range(10)}
            assert after == {"bad", "good"}  # the trial passed: back in rotation
            assert MODEL not in node.model_health


async def test_a_model_failing_on_one_node_leaves_the_node_to_the_others() -> None:
    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        if body["model"] == MODEL:  # too large for what this node has left
            return web.json_response({"error": "model requires more memory"}, status=500)
        return web.json_response({"model": body["model"], "response": "ok", "done": True})

    runner, port = await one_node_app((MODEL, "qwen3:8b"), generate=generate)
    try:
        async with Emulator(EmulatorConfig(name="good", models=[MODEL])) as good:
            settings = settings_dict([("good", 1, good)], **FAST)
            settings["services"]["ollama"]["nodes"].append(
                {"name": "small", "host": "127.0.0.1", "port": port}
            )
            async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
                url = str(server.make_url("")).rstrip("/")
                fleet = server.app[GATEWAY].fleet
                small = fleet.get("small")
                assert small is not None
                for _ in range(6):
                    assert await served_by(http, url, BODY) == "good"
                assert not small.serves(MODEL, time.monotonic())
                assert small.health.is_routable(time.monotonic())
                other = {**BODY, "model": "qwen3:8b"}
                assert await served_by(http, url, other) == "small"
                nodes = (await (await http.get(url + "/admin/nodes")).json())["nodes"]
                [view] = [n for n in nodes if n["name"] == "small"]
                assert view["state"] == "healthy" and MODEL in view["models_out"]
    finally:
        await runner.cleanup()


async def test_requests_whose_node_dies_under_them_go_to_another_node() -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        await request.read()
        assert request.transport is not None
        request.transport.abort()  # as a node SIGKILLed mid-request: the connection drops
        return web.Response()

    runner, port = await one_node_app(generate=dies)
    try:
        async with Emulator(EmulatorConfig(name="good", models=[MODEL])) as good:
            settings = settings_dict([("good", 1, good)], **FAST)
            settings["services"]["ollama"]["nodes"].append(
                {"name": "dying", "host": "127.0.0.1", "port": port}
            )
            async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
                url = str(server.make_url("")).rstrip("/")
                served = await asyncio.gather(*(served_by(http, url, BODY) for _ in range(24)))
                assert set(served) == {"good"}
                dying = server.app[GATEWAY].fleet.get("dying")
                assert dying is not None and dying.last_death > 0
    finally:
        await runner.cleanup()
