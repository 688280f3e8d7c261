"""Two gateways (real olmd processes) over a real Redis share a tenant's limits and
show the same usage; without Redis each enforces its share of the limit alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.cluster.support import gateway
from tests.gateway.support import MODEL
from tests.helpers import RedisServer, free_port, settings_dict

KEY = "team-key-0123456789"
BODY = {"model": MODEL, "prompt": "hi", "stream": False}


async def test_two_gateways_share_a_requests_per_minute_limit_and_the_usage(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with Emulator(EmulatorConfig(name="n1", models=[MODEL], tokens=2)) as node:
        data = settings_dict([("n1", 1, node)])
        data["cluster"] = {"publish_interval": 0.1}
        data["tenants"] = [{"name": "team", "requests_per_minute": 30}]
        a_data = {**data, "usage": {"record": "a-usage.json"}}
        b_data = {
            **data,
            "server": {**data["server"], "port": free_port()},
            "usage": {"record": "b-usage.json"},
        }
        env = {"OLMD_API_KEYS": f"team:{KEY}"}
        async with (
            gateway(tmp_path, "gw-a", a_data, redis_server.url, **env) as a,
            gateway(tmp_path, "gw-b", b_data, redis_server.url, **env) as b,
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as http,
        ):

            async def one(url: str) -> int:
                async with http.post(url + "/api/generate", json=BODY) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(a if i % 2 else b) for i in range(40)))
            ok, refused = statuses.count(200), statuses.count(429)
            print(f"two gateways, 40 requests at once: {ok} answered, {refused} refused")
            # One gateway admits 30 of 40 at once (the bucket refills 0.5 a second).
            assert 30 <= ok <= 32 and ok + refused == 40

            async def usage(url: str) -> dict[str, object]:
                async with http.get(url + "/admin/usage") as resp:
                    view = await resp.json()
                [team] = [t for t in view["tenants"] if t["tenant"] == "team"]
                assert view["counted_by"] == "every gateway"
                return dict(team["usage"]["totals"])

            for _ in range(50):  # each gateway sends its counts every half second
                seen = await usage(a), await usage(b)
                if seen[0] == seen[1] and seen[0].get("requests") == 40:
                    break
                await asyncio.sleep(0.1)
            assert seen[0] == seen[1]
            assert seen[0]["requests"] == 40 and seen[0]["rate_limited"] == refused

            # Redis gone: each gateway enforces its share of the limit (30 / 2) alone.
            await redis_server.stop()
            alone = await asyncio.gather(*(one(a) for _ in range(20)))
            assert alone.count(200) == 15 and alone.count(429) == 5
            async with http.get(a + "/admin/usage") as resp:
                view = await resp.json()
            assert view["counted_by"] == "this gateway" and "(1/2)" in view["note"]
