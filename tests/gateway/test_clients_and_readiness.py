"""What a gateway's neighbours rely on: readiness that means "can route", a reader that
stops reading is cut, a dead node's refused connections cost no request."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.gateway.support import GENERATE, MODEL, post, url
from tests.helpers import eventually, running_olmd, settings_dict

INTERVAL = 0.5


async def readiness(http: aiohttp.ClientSession, server: object) -> tuple[int, dict]:
    async with http.get(url(server, "/readyz")) as resp:
        return resp.status, await resp.json()


async def test_readyz_follows_whether_any_node_answers() -> None:
    emulators = [Emulator(EmulatorConfig(name=n, models=[MODEL])) for n in ("a", "b")]
    for emu in emulators:
        await emu.start()
    try:
        data = settings_dict([("a", 1, emulators[0]), ("b", 1, emulators[1])])
        data["routing"]["probe_interval"] = INTERVAL
        async with running_olmd(data) as server, aiohttp.ClientSession() as http:
            assert (await readiness(http, server))[0] == 200
            for emu in emulators:
                await emu.stop()
            killed = time.monotonic()
            while (status := await readiness(http, server))[0] == 200:
                assert time.monotonic() - killed < 2 * INTERVAL, "still ready"
                await asyncio.sleep(0.02)
            assert status == (503, {"status": "unready", "reason": "no node answering"})
            async with http.get(url(server, "/healthz")) as resp:
                assert resp.status == 200  # the process is alive all the same
            await emulators[1].start()
            back = time.monotonic()
            while (await readiness(http, server))[0] != 200:
                assert time.monotonic() - back < INTERVAL + 0.25, "not ready again in time"
                await asyncio.sleep(0.02)
    finally:
        for emu in emulators:
            await emu.stop()


async def test_readiness_process_keeps_the_old_meaning() -> None:
    async with Emulator(EmulatorConfig(models=[MODEL])) as emu:
        data = settings_dict([("a", 1, emu)])
        data["server"]["readiness"] = "process"
        async with running_olmd(data) as server, aiohttp.ClientSession() as http:
            await emu.stop()
            await asyncio.sleep(3 * 0.5)
            assert (await readiness(http, server))[0] == 200


async def test_a_client_that_stops_reading_is_cut_and_the_node_request_cancelled() -> None:
    # Big answers, as fast as the node can make them: the client's window fills at once.
    config = EmulatorConfig(models=[MODEL], tokens=2_000_000, token_delay=0)
    async with Emulator(config) as emu:
        data = settings_dict([("a", 1, emu)], write_timeout=0.5)
        async with running_olmd(data) as server:
            body = json.dumps({"model": MODEL, "prompt": "everything", "stream": True}).encode()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(
                sock,
                b"POST /api/generate HTTP/1.1\r\nHost: olmd\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body,
            )
            try:  # and then never read
                await eventually(lambda: emu.state.stats.in_flight == 1, timeout=5)
                started = time.monotonic()
                await eventually(lambda: emu.state.stats.cancelled == 1, timeout=5)
                assert time.monotonic() - started < 0.5 + 1.0
                assert emu.state.stats.in_flight == 0
            finally:
                sock.close()


async def failovers(http: aiohttp.ClientSession, server: object) -> float:
    async with http.get(url(server, "/metrics")) as resp:
        text = await resp.text()
    lines = [line for line in text.splitlines() if line.startswith("olmd_failovers_total{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def test_a_burst_at_a_dead_node_loses_nothing() -> None:
    # Requests refused by a node that died never reached a GPU: they all go elsewhere,
    # however many arrive at once, and the node is out of rotation after the first.
    emulators = [Emulator(EmulatorConfig(name=n, models=[MODEL])) for n in ("a", "b", "c")]
    for emu in emulators:
        await emu.start()
    try:
        fleet = [(e.state.config.name, 1, e) for e in emulators]
        data = settings_dict(fleet, probe_interval=30, failures_to_eject=5)
        async with running_olmd(data) as server, aiohttp.ClientSession() as http:
            await emulators[0].stop()
            results = await asyncio.gather(
                *(post(http, server, "/api/generate", GENERATE) for _ in range(64))
            )
            assert Counter(status for status, _, _ in results) == {200: 64}
            assert {node for _, node, _ in results} == {"b", "c"}
            assert await failovers(http, server) > 3  # more than the retry budget's minimum
            before = await failovers(http, server)
            again = await asyncio.gather(
                *(post(http, server, "/api/generate", GENERATE) for _ in range(64))
            )
            assert Counter(status for status, _, _ in again) == {200: 64}
            assert await failovers(http, server) == before  # a is out of rotation
    finally:
        for emu in emulators:
            await emu.stop()
