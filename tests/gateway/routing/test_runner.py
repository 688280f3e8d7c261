"""What Ollama's scheduler does that routing must know: a request asking for another
context length (or other runner options) reloads the model; embedding models run one
request at a time; ``-cloud`` models run on ollama.com and take no local slot."""

from __future__ import annotations

import asyncio

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway.component import GATEWAY
from daemon.ports import RouteRequest
from tests.gateway.support import MODEL
from tests.helpers import running_olmd, settings_dict

CLOUD = "gpt-oss:120b-cloud"
EMBED = "nomic-embed-text:latest"


async def warm(http: aiohttp.ClientSession, emu: Emulator) -> None:
    body = {"model": MODEL, "prompt": "", "keep_alive": "1h"}  # an empty prompt only loads
    async with http.post(emu.url + "/api/generate", json=body) as resp:
        assert resp.status == 200


async def chat(
    http: aiohttp.ClientSession, url: str, text: str, num_ctx: int | None
) -> tuple[str, str]:
    options = {"num_ctx": num_ctx} if num_ctx else {}
    body = {"model": MODEL, "stream": False, "options": options}
    body["messages"] = [{"role": "user", "content": text}]
    async with http.post(url + "/api/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-Olmd-Node"], resp.headers["X-Olmd-Route"]


async def test_another_context_length_is_a_reload_and_goes_where_it_is_loaded() -> None:
    config = {"models": [MODEL], "num_parallel": 2, "tokens": 2, "load_delay": 0.2}
    async with (
        Emulator(EmulatorConfig(name="n0", **config)) as n0,
        Emulator(EmulatorConfig(name="n1", **config)) as n1,
        aiohttp.ClientSession() as http,
    ):
        for emu in (n0, n1):
            await warm(http, emu)  # /api/ps: loaded, context_length 4096
        settings = settings_dict(
            [("n0", 1, n0), ("n1", 1, n1)], strategy="adaptive", parallel=2, cold_load_seconds=5
        )
        async with running_olmd(settings) as server:
            router = server.app[GATEWAY].router
            node = server.app[GATEWAY].fleet.get("n0")
            assert node is not None and node.loaded[MODEL]["context_length"] == 4096
            big = RouteRequest(MODEL, 10, runner=(("num_ctx", 8192),))
            same = RouteRequest(MODEL, 10, runner=(("num_ctx", 4096),))
            assert router._load_seconds(node, big) >= 5  # a reload
            assert router._load_seconds(node, same) == 0
            assert router._load_seconds(node, RouteRequest(MODEL, 10)) == 0
            url = str(server.make_url("")).rstrip("/")
            warm_loads = sum(e.state.stats.cold_loads for e in (n0, n1))
            first, _ = await chat(http, url, "a long context, please", 8192)
            # That node now runs 8192 (the emulator reloaded it, as Ollama does): 4096
            # there is a reload again, so the two contexts settle on two nodes.
            other = server.app[GATEWAY].fleet.get(first)
            assert other is not None and other.runners[MODEL] == {"num_ctx": 8192}
            assert router._reloads(other, same) and not router._reloads(other, big)
            small, _ = await chat(http, url, "a short one", 4096)
            again, _ = await chat(http, url, "another long one", 8192)
            assert small != first and again == first
            reloads = sum(e.state.stats.cold_loads for e in (n0, n1)) - warm_loads
            assert reloads == 1  # the first 8192 request's, and no thrashing after it


async def test_embedding_models_run_one_request_at_a_time_per_node() -> None:
    async with Emulator(EmulatorConfig(name="n0", models=[MODEL, EMBED])) as n0:
        settings = settings_dict([("n0", 1, n0)], strategy="adaptive", parallel=4)
        async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            body = {"model": EMBED, "input": ["a", "b"]}
            async with http.post(url + "/api/embed", json=body) as resp:
                assert resp.status == 200
            router, node = server.app[GATEWAY].router, server.app[GATEWAY].fleet.get("n0")
            assert router.slots(node, EMBED) == 1 and router.slots(node, MODEL) == 4
            # A model that generates too is not embedding-only: its slots come back.
            body = {"model": MODEL, "input": "a"}
            async with http.post(url + "/api/embed", json=body) as resp:
                assert resp.status == 200
            assert router.slots(node, MODEL) == 1
            generate = {"model": MODEL, "prompt": "hi", "stream": False}
            async with http.post(url + "/api/generate", json=generate) as resp:
                assert resp.status == 200
            assert router.slots(node, MODEL) == 4


async def test_cloud_models_take_no_local_slot() -> None:
    config = EmulatorConfig(name="n0", models=[MODEL, CLOUD], tokens=10, token_delay=0.02)
    async with Emulator(config) as n0:
        settings = settings_dict([("n0", 1, n0)], strategy="adaptive", parallel=1)
        async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            router = server.app[GATEWAY].router
            body = {"model": CLOUD, "prompt": "hi", "stream": False}

            async def one() -> str:
                async with http.post(url + "/api/generate", json=body) as resp:
                    assert resp.status == 200
                    await resp.read()
                    return resp.headers["X-Olmd-Route"]

            task = asyncio.gather(*(one() for _ in range(4)))
            await asyncio.sleep(0.1)
            assert router.queued == 0  # one slot, four requests: none waits in olmd
            assert CLOUD not in server.app[GATEWAY].fleet.get("n0").busy
            assert await task == ["cloud"] * 4
