"""Soak: one of three nodes, each declared with 8 slots, SIGKILLed and restarted about
every 3 s while 16 clients send streaming and non-streaming requests through olmd (all
real processes, on loopback).

No request that had not started streaming is lost while another node is up; a stream cut
mid-way ends with exactly one error line; olmd's memory stays flat; every request sent is
accounted for. Bounded: about 30 s of load, at most a few thousand requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.helpers import free_port, olmd_command, settings_dict, write_settings

MODEL = "llama3.1:8b"
SOAK_SECONDS = 24.0
CLIENTS = 16
PER_CLIENT = 400  # a bound on requests, whatever the machine's speed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@dataclass
class Node:
    name: str
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        argv = [sys.executable, "-m", "daemon", "emulate", "--name", self.name]
        argv += ["--port", str(self.port), "--models", MODEL]
        argv += ["--tokens", "12", "--token-delay", "0.02"]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        await wait_http(f"http://127.0.0.1:{self.port}/api/version")

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


async def wait_http(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} never answered"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def fleet_and_olmd(tmp_path: Path) -> AsyncIterator[tuple[list[Node], int, int]]:
    nodes = [Node(name) for name in ("a", "b", "c")]
    olmd: asyncio.subprocess.Process | None = None
    try:
        for node in nodes:
            await node.start()
        data = settings_dict([], probe_interval=0.5, parallel=8, queue_timeout=20)
        data["services"]["ollama"]["nodes"] = [
            {"name": n.name, "host": "127.0.0.1", "port": n.port} for n in nodes
        ]
        config = write_settings(tmp_path / "settings.toml", data)
        port = data["server"]["port"]
        olmd = await asyncio.create_subprocess_exec(
            *olmd_command("--config", str(config), "--log-level", "error", "serve"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        yield nodes, port, olmd.pid
    finally:
        if olmd is not None and olmd.returncode is None:
            olmd.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await olmd.wait()
        for node in nodes:
            await node.kill()


async def one_request(http: aiohttp.ClientSession, url: str, stream: bool) -> str:
    """The outcome of one request: ok, cut (a stream ended by one error line), or a failure
    description."""
    body = {"model": MODEL, "prompt": "soak", "stream": stream}
    async with http.post(url + "/api/generate", json=body) as resp:
        raw = await resp.read()
        if resp.status != 200:
            return f"HTTP {resp.status}: {raw[:200]!r}"
    lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if not stream:
        return "ok" if len(lines) == 1 and lines[0].get("done") else f"bad body {raw[:200]!r}"
    errors = [i for i, line in enumerate(lines) if "error" in line]
    if not errors:
        return "ok" if lines and lines[-1].get("done") else f"stream without end {raw[-200:]!r}"
    # A cut stream: data first (it had started), then exactly one error line, last.
    if errors == [len(lines) - 1] and len(lines) > 1 and not any(x.get("done") for x in lines):
        return "cut"
    return f"bad cut {raw[-300:]!r}"


async def test_a_node_killed_again_and_again_loses_no_request(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    async with fleet_and_olmd(tmp_path) as (nodes, port, pid):
        url = f"http://127.0.0.1:{port}"
        outcomes: Counter[str] = Counter()
        sent = 0
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(50):  # warm up, then take the memory baseline
                await one_request(http, url, stream=rng.random() < 0.5)
            baseline = rss_kib(pid)
            stop_at = time.monotonic() + SOAK_SECONDS

            async def client(seed: int) -> None:
                nonlocal sent
                mine = random.Random(seed)
                for _ in range(PER_CLIENT):
                    if time.monotonic() >= stop_at:
                        return
                    sent += 1
                    outcomes[await one_request(http, url, stream=mine.random() < 0.5)] += 1

            async def killer() -> int:
                kills = 0
                victim = nodes[0]
                while time.monotonic() + 3 < stop_at:
                    await asyncio.sleep(rng.uniform(2.5, 3.0))
                    await victim.kill()
                    kills += 1
                    await asyncio.sleep(rng.uniform(0.3, 0.8))
                    await victim.start()
                return kills

            results = await asyncio.gather(killer(), *(client(i) for i in range(CLIENTS)))
            kills = results[0]
            grown = rss_kib(pid) - baseline
        print(f"soak: {sent} requests, {dict(outcomes)}, {kills} kills, rss +{grown} KiB")
        failures = {k: v for k, v in outcomes.items() if k not in ("ok", "cut")}
        assert failures == {}, failures
        assert sum(outcomes.values()) == sent  # every request accounted for
        assert kills >= 5 and sent > 300, (kills, sent)
        assert outcomes["cut"] > 0  # the kills did cut streams, and they ended cleanly
        assert grown < 8 * 1024, f"olmd grew by {grown} KiB"
