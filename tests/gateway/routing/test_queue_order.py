"""Within a tenant, the waiter that costs least to start goes first: a short follow-up
whose history the node holds before a long first turn."""

from __future__ import annotations

import asyncio

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL
from tests.helpers import eventually, running_olmd, settings_dict

DOCUMENT = "A long pasted document, line after line of it. " * 250  # ~3 000 tokens


async def chat(
    http: aiohttp.ClientSession, url: str, messages: list[dict[str, str]], tokens: int = 2
) -> None:
    body = {"model": MODEL, "messages": messages, "stream": False, "keep_alive": "1h"}
    body["options"] = {"num_predict": tokens}
    async with http.post(url + "/api/chat", json=body) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def test_a_cached_follow_up_goes_before_a_long_first_turn() -> None:
    config = EmulatorConfig(
        name="n0", models=[MODEL], num_parallel=1, prompt_rate=20_000, tokens=30, token_delay=0.01
    )
    async with Emulator(config) as node:
        settings = settings_dict([("n0", 1, node)], strategy="adaptive", parallel=1)
        async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            mine = [{"role": "user", "content": "Tell me about routing."}]
            await chat(http, url, mine)  # the node now holds this conversation
            mine += [
                {"role": "assistant", "content": "reply"},
                {"role": "user", "content": "And?"},
            ]
            done: list[str] = []

            async def one(name: str, messages: list[dict[str, str]], tokens: int = 2) -> None:
                await chat(http, url, messages, tokens)
                done.append(name)

            router = server.app[GATEWAY].router
            hold = [{"role": "user", "content": "x" * 9}]
            blocker = asyncio.create_task(one("blocker", hold, tokens=30))  # ~0.3 s
            await eventually(lambda: router.fleet.get("n0").busy.get(MODEL) == 1)
            long_first = asyncio.create_task(
                one("document", [{"role": "user", "content": DOCUMENT}])
            )
            await eventually(lambda: router.queued == 1)
            follow_up = asyncio.create_task(one("follow-up", mine))
            await asyncio.gather(blocker, long_first, follow_up)
    assert done == ["blocker", "follow-up", "document"]
