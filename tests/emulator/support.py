"""What the emulator's tests share besides fixtures: constants and small HTTP helpers."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from openai.types.chat import ChatCompletionUserMessageParam

from daemon.emulator.server import Emulator

MODELS = ["llama3.1:8b", "nomic-embed-text"]
HEX64 = re.compile(r"^[0-9a-f]{64}$")
BUSY = "server busy, please try again.  maximum pending requests exceeded"
QUESTION: list[ChatCompletionUserMessageParam] = [
    {"role": "user", "content": "Why is the sky blue?"}
]
CHAT: dict[str, Any] = {"model": "llama3.1:8b", "messages": QUESTION}
DURATIONS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


async def call(
    http: aiohttp.ClientSession, emu: Emulator, path: str, body: Any = None, method: str = "POST"
) -> tuple[int, str, str]:
    async with http.request(method, emu.url + path, json=body) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.text()


async def configure(http: aiohttp.ClientSession, emu: Emulator, **patch: Any) -> None:
    status, _, text = await call(http, emu, "/_emulator/config", patch)
    assert status == 200, text


async def stats(http: aiohttp.ClientSession, emu: Emulator) -> dict[str, Any]:
    status, _, text = await call(http, emu, "/_emulator/stats", method="GET")
    assert status == 200
    result: dict[str, Any] = json.loads(text)
    return result


async def drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


async def read_lines(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    into: list[bytes],
    each: Callable[[bytes], Awaitable[None]] | None = None,
) -> None:
    """Collect a streamed answer's lines, calling ``each`` before keeping one."""
    async with http.post(url, json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if each is not None:
                await each(line)
            into.append(line)


async def until(predicate: Any, timeout: float = 1.0) -> None:
    """Poll an async predicate every 10 ms, at most ``timeout`` seconds."""
    for _ in range(int(timeout / 0.01)):
        if await predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")
