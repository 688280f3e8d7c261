"""``olmd demo`` as a newcomer runs it: a real process, two emulated nodes, real requests."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp

from daemon.cli.demo import PERFORMANCE
from tests.helpers import free_port, olmd_command

GENERATE = {"model": "llama3.1:8b", "prompt": "hi", "stream": False, "options": {"num_predict": 1}}


@contextlib.asynccontextmanager
async def demo(*args: str) -> AsyncIterator[str]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *olmd_command("--log-format", "json", "demo", "--port", str(port), *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"olmd demo is running" not in await proc.stdout.readline():
                pass
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await proc.communicate()
        assert proc.returncode == 0


async def test_the_weighted_demo_splits_thirty_requests_twenty_to_ten() -> None:
    async with demo("--strategy", "weighted") as url, aiohttp.ClientSession() as http:
        served = []
        for _ in range(30):
            async with http.post(url + "/api/generate", json=GENERATE) as resp:
                assert resp.status == 200
                assert resp.headers["X-Olmd-Route"] == "weighted"
                served.append(resp.headers["X-Olmd-Node"])
        assert Counter(served) == {"gpu-a": 20, "gpu-b": 10}


async def test_the_adaptive_demo_keeps_a_conversation_where_its_cache_is() -> None:
    async with demo() as url, aiohttp.ClientSession() as http:
        history = [{"role": "user", "content": "Summarise: " + "a document. " * 200}]
        routes, counts = [], []
        for _ in range(3):
            body = {"model": "llama3.1:8b", "messages": history, "stream": False}
            async with http.post(url + "/api/chat", json=body) as resp:
                assert resp.status == 200
                answer = await resp.json()
                routes.append((resp.headers["X-Olmd-Node"], resp.headers["X-Olmd-Route"]))
            # the whole prompt is counted; its evaluation takes only the uncached part
            counts.append(answer["prompt_eval_duration"] * PERFORMANCE["prompt_rate"] / 1e9)
            history += [answer["message"], {"role": "user", "content": "and then?"}]
        assert len({node for node, _ in routes}) == 1
        assert [route for _, route in routes[1:]] == ["affinity", "affinity"]
        assert counts[0] > 500 and max(counts[1:]) < 20
