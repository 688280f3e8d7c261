"""The log lines an operator follows: a node going and coming back, an ejection and its
end, a failover; nothing at info level for requests that simply work."""

from __future__ import annotations

import aiohttp
from structlog.testing import capture_logs

from daemon.emulator.server import Emulator, EmulatorConfig
from tests.gateway.support import GENERATE, MODEL, post
from tests.helpers import eventually, running_olmd, settings_dict


async def test_an_outage_and_a_recovery_read_as_one_line_each() -> None:
    a, b = (Emulator(EmulatorConfig(name=n, models=[MODEL])) for n in ("a", "b"))
    await a.start()
    await b.start()
    try:
        data = settings_dict([("a", 1, a), ("b", 1, b)], probe_interval=0.3, fall=2, rise=1)
        async with running_olmd(data) as server, aiohttp.ClientSession() as http:
            with capture_logs() as quiet:
                for _ in range(10):
                    assert (await post(http, server, "/api/generate", GENERATE))[0] == 200
            assert [e for e in quiet if e["log_level"] in ("info", "warning", "error")] == []

            with capture_logs() as events:
                await a.stop()
                statuses = [(await post(http, server, "/api/generate", GENERATE))[0]]
                statuses += [(await post(http, server, "/api/generate", GENERATE))[0]]

                def seen(name: str) -> bool:
                    return any(e["event"] == name for e in events)

                await eventually(lambda: seen("node_down"), timeout=5)
                await a.start()
                await eventually(lambda: seen("node_up") and seen("node_ejection_ended"), 5)
            assert statuses == [200, 200]
            names = [(e["event"], e.get("node"), e["log_level"]) for e in events]
            assert names.count(("node_ejected", "a", "warning")) == 1
            assert names.count(("node_down", "a", "warning")) == 1
            assert names.count(("node_up", "a", "info")) == 1
            assert names.count(("node_ejection_ended", "a", "info")) == 1
            failovers = [e for e in events if e["event"] == "failover"]
            assert len(failovers) == 1 and failovers[0]["reason"] == "refused"
            assert failovers[0]["node"] == "a" and failovers[0]["log_level"] == "info"
    finally:
        await a.stop()
        await b.stop()
