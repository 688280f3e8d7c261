"""Ollama's performance model on a running emulator: slots, KV caches, loads, keep-alive.

Durations are compared with each other, from the answers' own metrics, not with the
wall clock; delays stay small so the whole file runs in a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from daemon.emulator import tokens as tok
from daemon.emulator.server import Emulator, EmulatorConfig, add_arguments, run_from_args
from tests.emulator.support import BUSY, call, configure, stats, until

A, B = "llama3.1:8b", "qwen3:0.6b"
MS = 1_000_000
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 8
QUESTION = {"role": "user", "content": "Why is the sky blue?"}
FOLLOW_UP = {"role": "user", "content": "And at sunset?"}


def slots(**config: Any) -> EmulatorConfig:
    """A node whose prompt_eval_count shows what its caches saved (the older count)."""
    return EmulatorConfig(
        models=[A, B, "nomic-embed-text"], **{"prompt_count": "evaluated", **config}
    )


async def chat(
    http: aiohttp.ClientSession, emu: Emulator, messages: list[Any], model: str = A, **extra: Any
) -> dict[str, Any]:
    body = {"model": model, "messages": messages, "stream": False, **extra}
    status, _, text = await call(http, emu, "/api/chat", body)
    assert status == 200, text
    reply: dict[str, Any] = json.loads(text)
    return reply


async def running(http: aiohttp.ClientSession, emu: Emulator) -> list[str]:
    _, _, text = await call(http, emu, "/api/ps", method="GET")
    return [m["name"] for m in json.loads(text)["models"]]


def new_tokens(before: list[Any], after: list[Any]) -> int:
    """Tokens of ``after`` past the cached ``before`` (a turn's history with its reply)."""
    cached, prompt = tok.chat(before), tok.chat(after)
    assert prompt[: len(cached)] == cached
    return len(prompt) - len(cached)


# ---------------------------------------------------------------- the KV cache


async def test_second_turn_evaluates_only_the_new_tokens() -> None:
    async with (
        Emulator(slots(num_parallel=1, prompt_rate=4000, tokens=6)) as emu,
        ollama.AsyncClient(host=emu.url) as client,
    ):
        history: list[Any] = [{"role": "system", "content": SYSTEM}, QUESTION]
        first = await client.chat(model=A, messages=history)
        history.append(first.message)  # the reply as the client got it
        answered = [*history[:2], {"role": "assistant", "content": first.message.content}]
        second = await client.chat(model=A, messages=[*history, FOLLOW_UP])
        seen = emu.state.stats
    assert first.prompt_eval_count == len(tok.chat(history[:2])) > 100
    assert second.prompt_eval_count == new_tokens(answered, [*answered, FOLLOW_UP]) < 10
    assert (second.prompt_eval_duration or 0) * 5 < (first.prompt_eval_duration or 0)
    assert (second.total_duration or 0) < (first.total_duration or 0)
    assert seen.prompt_tokens_cached == len(tok.chat(answered))
    assert seen.prompt_tokens_evaluated == first.prompt_eval_count + second.prompt_eval_count


async def test_a_streamed_reply_appended_is_a_cache_hit() -> None:
    async with (
        Emulator(slots(num_parallel=1)) as emu,
        openai.AsyncOpenAI(base_url=emu.url + "/v1", api_key="x", max_retries=0) as client,
    ):
        history: list[Any] = [QUESTION]
        stream = await client.chat.completions.create(model=A, messages=history, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        history += [{"role": "assistant", "content": text}, FOLLOW_UP]
        second = await client.chat.completions.create(model=A, messages=history)
    assert second.usage is not None
    assert second.usage.prompt_tokens == new_tokens(history[:2], history)


async def test_generate_with_the_returned_context_is_a_cache_hit() -> None:
    async with Emulator(slots(num_parallel=1)) as emu, ollama.AsyncClient(host=emu.url) as client:
        first = await client.generate(model=A, prompt="Why is the sky blue?", system="Be brief.")
        prompt = tok.generate("Why is the sky blue?", "Be brief.")
        assert first.context == prompt + tok.reply(first.response)
        assert first.prompt_eval_count == len(prompt)
        parts = [
            p
            async for p in await client.generate(A, "And red?", context=first.context, stream=True)
        ]
    last = parts[-1]
    assert last.prompt_eval_count == len(tok.generate("And red?"))
    streamed = "".join(p.response for p in parts)
    assert last.context == list(first.context) + tok.generate("And red?") + tok.reply(streamed)


async def test_two_slots_keep_two_interleaved_conversations(
    http: aiohttp.ClientSession,
) -> None:
    x: list[Any] = [{"role": "user", "content": "Tell me about the sea."}]
    y: list[Any] = [{"role": "user", "content": "Explain the tides, please."}]
    async with Emulator(slots(num_parallel=2)) as emu:
        x1 = await chat(http, emu, x)
        y1 = await chat(http, emu, y)
        x += [x1["message"], FOLLOW_UP]
        y += [y1["message"], FOLLOW_UP]
        x2 = await chat(http, emu, x)
        y2 = await chat(http, emu, y)
        seen = await stats(http, emu)
    # y shares its start ("user") with x's slot, over a tenth of its prompt: llama-server
    # takes that slot rather than the empty one, and saves x's state to the host cache
    shared = tok.common_prefix(tok.chat(x[:2]), tok.chat(y[:1]))
    assert y1["prompt_eval_count"] == len(tok.chat(y[:1])) - shared
    assert x2["prompt_eval_count"] == new_tokens(x[:2], x)  # restored into the empty slot
    assert y2["prompt_eval_count"] == new_tokens(y[:2], y)  # in the slot it took
    assert seen["max_slots_in_use"] == {A: 1} and seen["cold_loads"] == 1
    assert seen["cache_restored"] == len(tok.chat(x[:2]))


@pytest.mark.parametrize("count", ["whole", "evaluated"])
@pytest.mark.parametrize("cache", [0, 4096])
async def test_the_host_cache_brings_back_a_conversation_the_slot_gave_up(
    http: aiohttp.ClientSession, count: str, cache: int
) -> None:
    rate = 20_000  # prompt tokens a second; the restore copies 10 x as fast
    x: list[Any] = [{"role": "system", "content": SYSTEM}, QUESTION]
    y: list[Any] = [{"role": "user", "content": "Explain the tides, please."}]
    config = slots(num_parallel=1, prompt_rate=rate, prompt_count=count, cache_tokens=cache)
    async with Emulator(config) as emu:
        x1 = await chat(http, emu, x)
        await chat(http, emu, y)  # takes the only slot: x's state goes to the host cache
        x += [x1["message"], FOLLOW_UP]
        x2 = await chat(http, emu, x)
        seen = await stats(http, emu)
    evaluated = new_tokens(x[:3], x) if cache else len(tok.chat(x))
    whole = len(tok.chat(x))
    assert x2["prompt_eval_count"] == (whole if count == "whole" else evaluated)
    assert x2["prompt_eval_duration"] == round(evaluated / rate * 1e9)  # computed, not timed
    restored = len(tok.chat(x[:3])) if cache else 0
    assert (seen["cache_restored"], seen["prompt_tokens_evaluated"] > evaluated) == (restored, True)
    if cache:  # the copy is neither load nor prompt time, but the answer's total has it
        copy_ns = restored / (10 * rate) * 1e9  # and the save of y's state before it
        assert x2["total_duration"] > x2["load_duration"] + x2["prompt_eval_duration"] + copy_ns


# ---------------------------------------------------------------- slots and the queue


async def test_requests_for_a_loaded_model_wait_without_bound_loads_fill_the_queue(
    http: aiohttp.ClientSession,
) -> None:
    # Ollama's scheduler: a request for a loaded model waits for its runner however many
    # wait; OLLAMA_MAX_QUEUE (here 0) bounds only the requests waiting for a load.
    async with Emulator(slots(num_parallel=1, queue=0, tokens=10, token_delay=0.02)) as emu:
        await _queue_semantics(http, emu)


async def _queue_semantics(http: aiohttp.ClientSession, emu: Emulator) -> None:
    first = asyncio.create_task(chat(http, emu, [QUESTION]))
    await until(lambda: _in_use(emu, 1))
    waiting = [asyncio.create_task(chat(http, emu, [FOLLOW_UP])) for _ in range(2)]
    await until(lambda: _queued(emu, 2))
    one, *two = [await first, *await asyncio.gather(*waiting)]
    assert all(t["total_duration"] > one["eval_duration"] for t in two)  # they waited ...
    assert all(t["load_duration"] < 20 * MS for t in two)  # ... which is not loading
    seen = await stats(http, emu)
    assert seen["max_slots_in_use"] == {A: 1} and seen["rejected"] == 0
    assert seen["queued"] == 0 and seen["slots_in_use"] == {}

    await configure(http, emu, load_delay=0.2)
    loading = asyncio.create_task(chat(http, emu, [QUESTION], model=B))  # loads: not queued
    await until(lambda: _loading(emu, B))
    status, _, text = await call(http, emu, "/api/chat", {"model": B, "messages": [QUESTION]})
    assert (status, json.loads(text)) == (503, {"error": BUSY})  # would wait for the load
    await loading
    assert (await stats(http, emu))["rejected"] == 1


async def test_an_embedding_model_has_one_slot(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, num_parallel=4)
    for model in (A, "nomic-embed-text"):
        status, _, _ = await call(http, emu, "/api/embed", {"model": model, "input": "a"})
        assert status == 200
    resident = {m: emu.state.models.resident(m) for m in (A, "nomic-embed-text:latest")}
    assert {m: len(r.slots) for m, r in resident.items() if r} == {
        A: 4,
        "nomic-embed-text:latest": 1,
    }


async def test_clients_that_leave_give_back_their_place(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, num_parallel=1, prompt_rate=20, load_delay=0.2)
    # the first leaves during the cold load: the second, waiting for it, loads instead
    first = asyncio.create_task(chat(http, emu, [QUESTION]))
    await until(lambda: _loading(emu))
    second = asyncio.create_task(chat(http, emu, [QUESTION], options={"num_predict": 1}))
    await until(lambda: _queued(emu, 1))
    first.cancel()
    # the second then evaluates its prompt at 20 tokens a second, for ever: it leaves too
    await until(lambda: _in_use(emu, 1))
    second.cancel()
    await until(lambda: _cancelled(emu, 2))
    seen = await stats(http, emu)
    assert (seen["cold_loads"], seen["queued"], seen["slots_in_use"]) == (1, 0, {})

    await configure(http, emu, prompt_rate=0)
    after = await chat(http, emu, [QUESTION])  # the slot is free; nothing was cached
    assert after["prompt_eval_count"] == len(tok.chat([QUESTION]))
    assert after["load_duration"] < 20 * MS


async def _loading(emu: Emulator, model: str = A) -> bool:
    return emu.state.models.is_loading(model)


async def _cancelled(emu: Emulator, count: int) -> bool:
    return emu.state.stats.cancelled == count


async def _in_use(emu: Emulator, count: int) -> bool:
    return emu.state.stats.slots_in_use.get(A, 0) == count


async def _queued(emu: Emulator, count: int) -> bool:
    return emu.state.stats.queued == count


# ---------------------------------------------------------------- residency


async def test_max_loaded_evicts_the_idle_model_and_its_cache(
    http: aiohttp.ClientSession,
) -> None:
    async with Emulator(slots(num_parallel=1, max_loaded=1, load_delay=0.05)) as emu:
        cold = await chat(http, emu, [QUESTION])
        warm = await chat(http, emu, [QUESTION])  # the same prompt: all cached but one token
        other = await chat(http, emu, [QUESTION], model=B)
        assert await running(http, emu) == [B]
        seen = await stats(http, emu)
        assert (seen["cold_loads"], seen["evictions"]) == (2, 1)
        back = await chat(http, emu, [QUESTION])
        seen = await stats(http, emu)
    assert cold["load_duration"] >= 50 * MS and warm["load_duration"] < 20 * MS
    assert warm["prompt_eval_count"] == 1
    assert other["load_duration"] >= 50 * MS
    assert back["load_duration"] >= 50 * MS
    assert back["prompt_eval_count"] == len(tok.chat([QUESTION]))  # the cache went with it
    assert (seen["cold_loads"], seen["evictions"]) == (3, 2)


async def test_a_load_waits_while_every_loaded_model_is_busy(
    http: aiohttp.ClientSession,
) -> None:
    config = slots(num_parallel=1, max_loaded=1, load_delay=0.02, tokens=10, token_delay=0.02)
    async with Emulator(config) as emu:
        busy = asyncio.create_task(chat(http, emu, [QUESTION]))
        await until(lambda: _in_use(emu, 1))
        other = await chat(http, emu, [QUESTION], model=B)
        first = await busy
    # B waited for A to go idle, then loaded: all of it is load_duration
    assert other["load_duration"] > first["eval_duration"] / 2
    assert other["total_duration"] > other["load_duration"]


async def test_keep_alive_expiry_unloads_and_drops_the_cache(
    http: aiohttp.ClientSession,
) -> None:
    async with Emulator(slots(num_parallel=1)) as emu:
        await chat(http, emu, [QUESTION], keep_alive="300ms")
        done = time.time_ns()
        assert await running(http, emu) == [A]
        expiry = emu.state.loaded[A]
        assert done - 50 * MS <= expiry - 300 * MS <= done  # now + keep_alive, at the end
        _, _, text = await call(http, emu, "/api/ps", method="GET")
        shown = datetime.fromisoformat(json.loads(text)["models"][0]["expires_at"])
        assert abs(shown.timestamp() - expiry / 1e9) < 0.001
        await until(lambda: _gone(http, emu), timeout=1.5)
        again = await chat(http, emu, [QUESTION])
        seen = await stats(http, emu)
    assert again["prompt_eval_count"] == len(tok.chat([QUESTION]))
    assert (seen["cold_loads"], seen["evictions"]) == (2, 0)  # expiry is not eviction


async def _gone(http: aiohttp.ClientSession, emu: Emulator) -> bool:
    return not await running(http, emu)


# ---------------------------------------------------------------- configuration


async def test_defaults_keep_the_old_behaviour(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, tokens=4, token_delay=0.02)
    both = await asyncio.gather(*(chat(http, emu, [QUESTION]) for _ in range(3)))
    seen = await stats(http, emu)
    assert seen["max_slots_in_use"] == {A: 3}  # no slot limit
    assert {b["prompt_eval_count"] for b in both} == {5}  # ceil(len(text) / 4), never cached
    assert seen["prompt_tokens_cached"] == 0


def test_config_fields_and_cli_flags() -> None:
    config = EmulatorConfig()
    assert (config.num_parallel, config.prompt_rate, config.max_loaded) == (0, 0.0, 3)
    assert (config.prompt_count, config.cache_tokens, config.restore_rate) == ("whole", 65536, 0)
    fields = ("num_parallel", "prompt_rate", "max_loaded", "prompt_count", "cache_tokens")
    for field in (*fields, "restore_rate"):
        assert EmulatorConfig.model_fields[field].description
    with pytest.raises(ValueError, match="num_parallel"):
        EmulatorConfig(num_parallel=-1)
    with pytest.raises(ValueError, match="prompt_count"):
        EmulatorConfig(prompt_count="cached")  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--num-parallel", "4", "--prompt-rate", "250", "--max-loaded", "2"])
    assert (args.num_parallel, args.prompt_rate, args.max_loaded) == (4, 250.0, 2)
    args = parser.parse_args(["--prompt-count", "evaluated", "--cache-tokens", "0"])
    assert (args.prompt_count, args.cache_tokens, args.restore_rate) == ("evaluated", 0, 0.0)
    assert run_from_args(parser.parse_args(["--max-loaded", "-1"])) == 2


async def test_another_num_ctx_reloads_the_model_and_ps_says_so() -> None:
    config = EmulatorConfig(name="n", models=["llama3.1:8b"], num_parallel=1, tokens=1)
    async with Emulator(config) as emu, aiohttp.ClientSession() as http:

        async def generate(**options: int) -> None:
            body = {"model": "llama3.1:8b", "prompt": "hi", "stream": False, "options": options}
            async with http.post(emu.url + "/api/generate", json=body) as resp:
                assert resp.status == 200

        async def context() -> int:
            async with http.get(emu.url + "/api/ps") as resp:
                [entry] = (await resp.json())["models"]
                return int(entry["context_length"])

        await generate()
        assert await context() == 4096 and emu.state.stats.cold_loads == 1
        await generate(num_ctx=8192)
        assert await context() == 8192 and emu.state.stats.cold_loads == 2
        await generate(num_ctx=8192)
        assert emu.state.stats.cold_loads == 2  # the same runner: no reload
