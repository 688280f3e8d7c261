"""Routing end to end: real emulated nodes with Ollama's performance model, olmd in front.

Weights hold under the classic strategies whatever is loaded where; slots are never
exceeded; a conversation stays on the node whose cache holds it, through one gateway or
alternating between two.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.settings import load_settings
from tests.gateway.support import MODEL
from tests.helpers import eventually, running_olmd, settings_dict, write_settings

PERF: dict[str, Any] = {"num_parallel": 1, "prompt_rate": 50_000.0, "tokens": 6}
DOCUMENT = "A long pasted document, line after line of it. " * 300  # about 3 500 tokens


@contextlib.asynccontextmanager
async def nodes(*weights: int, **perf: Any) -> AsyncIterator[list[tuple[str, int, Emulator]]]:
    async with contextlib.AsyncExitStack() as stack:
        out = []
        for i, weight in enumerate(weights):
            config = EmulatorConfig(name=f"n{i}", models=[MODEL], **(PERF | perf))
            out.append((f"n{i}", weight, await stack.enter_async_context(Emulator(config))))
        yield out


async def warm(http: aiohttp.ClientSession, emu: Emulator) -> None:
    body = {"model": MODEL, "prompt": "", "keep_alive": "1h"}  # an empty prompt only loads
    async with http.post(emu.url + "/api/generate", json=body) as resp:
        assert resp.status == 200


async def chat(
    http: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]], **headers: str
) -> tuple[str, str, str, dict[str, Any]]:
    """(node, route, reply, final chunk) of one streamed chat turn."""
    body = {"model": MODEL, "messages": messages, "keep_alive": "1h"}
    async with http.post(url + "/api/chat", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        reply, final = "", {}
        async for line in resp.content:
            chunk = json.loads(line)
            reply += chunk.get("message", {}).get("content", "")
            final = chunk
        return resp.headers["X-Olmd-Node"], resp.headers["X-Olmd-Route"], reply, final


async def generate(http: aiohttp.ClientSession, url: str) -> str:
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    async with http.post(url + "/api/generate", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Olmd-Node"]


async def test_weights_hold_whatever_is_loaded_and_after_a_restart() -> None:
    async with nodes(2, 1, num_parallel=0) as fleet, aiohttp.ClientSession() as http:
        await warm(http, fleet[0][2])  # only the weight-2 node has the model in memory
        data = settings_dict(fleet, strategy="weighted", parallel=1, probe_interval=0.5)
        async with running_olmd(data) as server:
            url = str(server.make_url("")).rstrip("/")
            first = [await generate(http, url) for _ in range(30)]
            assert Counter(first) == {"n0": 20, "n1": 10}
            restarted = fleet[1][2]
            await restarted.stop()
            assert {await generate(http, url) for _ in range(4)} == {"n0"}
            await restarted.start()  # back with nothing loaded
            await asyncio.sleep(0.5 + 0.2)  # one probe interval, and a margin
            after = [await generate(http, url) for _ in range(30)]
            assert Counter(after) == {"n0": 20, "n1": 10}


async def test_adaptive_uses_both_nodes_and_never_exceeds_their_slots() -> None:
    async with nodes(1, 1, token_delay=0.01) as fleet, aiohttp.ClientSession() as http:
        data = settings_dict(fleet, strategy="adaptive", parallel=1, queue_timeout=20)
        async with running_olmd(data) as server:
            url = str(server.make_url("")).rstrip("/")

            async def user(i: int) -> list[str]:
                history: list[dict[str, Any]] = [
                    {"role": "user", "content": f"user {i}: " + DOCUMENT}
                ]
                served = []
                for turn in range(3):
                    node, _, reply, _ = await chat(http, url, history)
                    served.append(node)
                    history += [
                        {"role": "assistant", "content": reply},
                        {"role": "user", "content": f"follow-up {turn}"},
                    ]
                return served

            served = await asyncio.wait_for(asyncio.gather(*(user(i) for i in range(4))), 30)
        assert {node for turns in served for node in turns} == {"n0", "n1"}
        for _, _, emu in fleet:
            stats = emu.state.stats
            assert stats.max_in_flight <= 1, stats
            assert max(stats.max_slots_in_use.values(), default=0) <= 1


async def test_a_conversation_stays_on_the_node_that_holds_it() -> None:
    async with nodes(1, 1, 1, num_parallel=2) as fleet, aiohttp.ClientSession() as http:
        for _, _, emu in fleet:
            await warm(http, emu)
        data = settings_dict(fleet, strategy="adaptive", parallel=2)
        async with running_olmd(data) as server:
            url = str(server.make_url("")).rstrip("/")
            histories = [
                [
                    {"role": "system", "content": "You answer briefly."},
                    {"role": "user", "content": f"conversation {i}: " + DOCUMENT},
                ]
                for i in range(3)
            ]
            placed: list[list[str]] = [[], [], []]
            follow_up_counts = []
            for turn in range(6):  # the three conversations interleaved, turn by turn
                for i, history in enumerate(histories):
                    node, route, reply, final = await chat(http, url, history)
                    placed[i].append(node)
                    if turn:
                        assert route == "affinity"
                        # prompt_eval_count counts the whole prompt; its duration,
                        # the emulator's modelled one, only what was evaluated
                        rate = PERF["prompt_rate"]
                        follow_up_counts.append(final["prompt_eval_duration"] * rate / 1e9)
                    history += [
                        {"role": "assistant", "content": reply},
                        {"role": "user", "content": f"and then {turn}?"},
                    ]
        for turns in placed:
            assert len(set(turns)) == 1, placed
        # Each follow-up evaluated only its new tokens on the node: the cache was there.
        assert max(follow_up_counts) < 100
        cached = sum(emu.state.stats.prompt_tokens_cached for _, _, emu in fleet)
        evaluated = sum(emu.state.stats.prompt_tokens_evaluated for _, _, emu in fleet)
        assert cached > 5 * evaluated


async def test_two_gateways_alternating_keep_a_conversation_on_one_node() -> None:
    async with nodes(1, 1, num_parallel=2) as fleet, aiohttp.ClientSession() as http:
        for _, _, emu in fleet:
            await warm(http, emu)
        data = settings_dict(fleet, strategy="adaptive", parallel=2)
        async with running_olmd(data) as one, running_olmd(data | {}) as two:
            urls = [str(s.make_url("")).rstrip("/") for s in (one, two)]
            for conversation in range(4):
                history = [{"role": "user", "content": f"topic {conversation}: " + DOCUMENT}]
                served = []
                for turn in range(6):
                    node, _, reply, _ = await chat(http, urls[turn % 2], history)
                    served.append(node)
                    history += [
                        {"role": "assistant", "content": reply},
                        {"role": "user", "content": "more"},
                    ]
                assert len(set(served)) == 1, (conversation, served)


async def test_a_session_key_pins_the_conversation() -> None:
    async with nodes(1, 1, num_parallel=2) as fleet, aiohttp.ClientSession() as http:
        for _, _, emu in fleet:
            await warm(http, emu)
        data = settings_dict(fleet, strategy="adaptive", parallel=2)
        async with running_olmd(data) as server:
            url = str(server.make_url("")).rstrip("/")
            served = set()
            for turn in range(4):  # unrelated short prompts: only the key ties them
                messages = [{"role": "user", "content": f"question {turn}"}]
                node, route, _, _ = await chat(http, url, messages, **{"X-Olmd-Session": "s-1"})
                served.add(node)
                if turn:
                    assert route == "affinity"
            assert len(served) == 1


async def test_admin_nodes_shows_slots_rates_and_conversations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", "admin-token-1")
    async with nodes(1, num_parallel=1) as fleet, aiohttp.ClientSession() as http:
        data = settings_dict(fleet, strategy="adaptive", parallel=1)
        async with running_olmd(load_settings(write_settings(tmp_path / "s.toml", data))) as server:
            url = str(server.make_url("")).rstrip("/")
            await chat(http, url, [{"role": "user", "content": DOCUMENT}])
            admin = {"Authorization": "Bearer admin-token-1"}
            async with http.get(url + "/admin/nodes", headers=admin) as resp:
                body = await resp.json()
            node = body["nodes"][0]
            assert body["strategy"] == "adaptive"
            assert node["slots"] == 1 and node["slots_in_use"] == {}
            assert node["conversations"] == 1
            learned = node["learned"][MODEL]
            assert learned["samples"] == 1 and learned["prompt_tokens_per_second"] > 0
            async with http.get(url + "/metrics") as resp:
                text = await resp.text()
            assert re.search(
                r'olmd_route_decisions_total\{reason="[a-z-]+",strategy="adaptive"\}', text
            )
            assert "olmd_node_slots" in text


@pytest.mark.parametrize("strategy", ["weighted", "adaptive"])
async def test_queued_requests_go_to_the_first_node_that_frees_a_slot(strategy: str) -> None:
    # One slow node, one fast: the fast one keeps freeing its slot and drains the queue.
    async with nodes(1, 1, token_delay=0.0) as fleet, aiohttp.ClientSession() as http:
        fleet[0][2].state.update({"token_delay": 0.3})
        data = settings_dict(fleet, strategy=strategy, parallel=1, queue_timeout=20)
        async with running_olmd(data) as server:
            url = str(server.make_url("")).rstrip("/")
            body = {"model": MODEL, "prompt": "x", "stream": False}

            async def one() -> str:
                async with http.post(url + "/api/generate", json=body) as resp:
                    assert resp.status == 200
                    return resp.headers["X-Olmd-Node"]

            served = Counter(await asyncio.gather(*(one() for _ in range(12))))
            await eventually(lambda: sum(e.state.stats.in_flight for _, _, e in fleet) == 0)
        assert served["n0"] <= 2 and served["n1"] >= 10, served
