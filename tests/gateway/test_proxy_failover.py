"""The proxy when nodes fail, against emulated nodes on loopback: failover, drains, caps,
cut streams, client disconnects, slow nodes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import aiohttp

from daemon.gateway.component import GATEWAY
from tests.gateway.support import GENERATE, MODEL, one_node_app, post, url
from tests.helpers import eventually, fetch, running_olmd, settings_dict


async def test_drain_stops_new_requests_but_lets_a_stream_finish(three) -> None:
    three[0][2].state.update({"tokens": 10, "token_delay": 0.05})
    async with running_olmd(settings_dict(three)) as server:
        gateway = server.app[GATEWAY]
        async with (
            aiohttp.ClientSession() as http,
            http.post(url(server, "/api/generate"), json={"model": MODEL, "prompt": "x"}) as s,
        ):
            assert s.headers["X-Olmd-Node"] == "a"
            await s.content.readline()
            gateway.fleet.set_draining("a", True)
            nodes = [(await post(http, server, "/api/generate", GENERATE))[1] for _ in range(5)]
            assert nodes == ["b"] * 5
            lines = (await s.content.read()).splitlines()
            assert json.loads(lines[-1])["done"] is True


async def test_failover_before_the_first_byte(three) -> None:
    a, b = three[0][2], three[1][2]
    async with running_olmd(settings_dict(three)) as server:
        async with aiohttp.ClientSession() as http:
            for fault in ("http500", "http503", "refuse", "stall"):
                a.state.update({"fault": fault, "fault_count": 1})
                if fault == "stall":
                    server.app[GATEWAY].proxy.configure(
                        server.app[GATEWAY].proxy.routing.model_copy(
                            update={"first_byte_timeout": 0.5}
                        )
                    )
                served = set()
                for _ in range(4):
                    status, node, data = await post(http, server, "/api/generate", GENERATE)
                    assert status == 200, (fault, data)
                    served.add(node)
                assert "b" in served
            # A 404 from a node that lost the model: the request goes to one that has it.
            a.state.update({"fault": "none", "models": ["nomic-embed-text"]})
            for _ in range(4):
                status, node, _ = await post(http, server, "/api/generate", GENERATE)
                assert (status, node) == (200, "b")
            # A 400 is the client's: passed through, no failover, no penalty.
            b.state.update({"fault": "none"})
            body = {"model": MODEL, "messages": []}
            requests_before = b.state.stats.requests.get("/v1/chat/completions", 0)
            status, node, data = await post(http, server, "/v1/chat/completions", body)
            assert (status, node) == (400, "b") and "too short" in data["error"]["message"]
            assert b.state.stats.requests["/v1/chat/completions"] == requests_before + 1


async def test_all_nodes_failing_gives_a_clear_error(three) -> None:
    for _, _, emu in three[:2]:
        emu.state.update({"fault": "http500"})
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        status, node, data = await post(http, server, "/api/generate", GENERATE)
        metrics = await (await fetch(http, "GET", url(server, "/metrics"))).text()
    assert status == 500 and node in ("a", "b") and data["error"]
    total = sum(emu.state.stats.requests.get("/api/generate", 0) for _, _, emu in three)
    assert total == 2  # each holder tried once, no more
    assert 'code="500",endpoint="/api/generate"' in metrics  # the failure is counted


async def test_in_flight_cap_queues_then_503_with_retry_after(three) -> None:
    for _, _, emu in three:
        emu.state.update({"tokens": 5, "token_delay": 0.1})
    data = settings_dict(three, max_in_flight_per_node=1, queue_limit=1, queue_timeout=5)
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(post(http, server, "/api/generate", GENERATE) for _ in range(4))
        )
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 200, 503]  # two run, one waits for a slot, one is turned away
    [refused] = [body for status, _, body in results if status == 503]
    assert "capacity" in refused["error"]
    assert max(emu.state.stats.max_in_flight for _, _, emu in three) == 1


async def test_stream_cut_by_the_node_ends_with_one_error_line(three) -> None:
    three[0][2].state.update({"fault": "cut", "fault_after": 3, "tokens": 8})
    async with running_olmd(settings_dict(three)) as server:
        async with aiohttp.ClientSession() as http:
            async with http.post(
                url(server, "/api/generate"), json={"model": MODEL, "prompt": "x"}
            ) as s:
                assert s.headers["X-Olmd-Node"] == "a"
                lines = (await s.content.read()).decode().splitlines()
    *chunks, last = lines
    assert len(chunks) == 3 and all(json.loads(c)["done"] is False for c in chunks)
    assert "error" in json.loads(last) and "node a" in json.loads(last)["error"]


async def test_sse_stream_cut_ends_with_an_sse_error(three) -> None:
    three[0][2].state.update({"fault": "cut", "fault_after": 2, "tokens": 8})
    async with running_olmd(settings_dict(three)) as server:
        async with aiohttp.ClientSession() as http:
            body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]}
            async with http.post(url(server, "/v1/chat/completions"), json=body) as s:
                text = (await s.content.read()).decode()
    events = [e for e in text.split("\n\n") if e.strip()]
    assert events[-1].startswith("data: {") and "error" in json.loads(events[-1][6:])
    assert "[DONE]" not in text


async def test_client_disconnect_cancels_the_node_request_within_a_second(three) -> None:
    a = three[0][2]
    a.state.update({"tokens": 200, "token_delay": 0.05})
    async with running_olmd(settings_dict(three)) as server:
        async with aiohttp.ClientSession() as http:
            response = await http.post(
                url(server, "/api/generate"), json={"model": MODEL, "prompt": "x"}
            )
            await response.content.readline()
            response.close()  # the client goes away mid-stream
        loop = asyncio.get_running_loop()
        start = loop.time()
        await eventually(lambda: a.state.stats.cancelled >= 1, timeout=1.0)
        assert loop.time() - start < 1.0


async def test_client_disconnect_during_a_cold_load_cancels_too(three) -> None:
    a = three[0][2]
    a.state.update({"load_delay": 5})
    async with running_olmd(settings_dict(three)) as server:
        async with aiohttp.ClientSession() as http:
            task = asyncio.create_task(http.post(url(server, "/api/generate"), json=GENERATE))
            await eventually(
                lambda: a.state.stats.in_flight + a.state.stats.requests.get("/api/generate", 0) > 0
            )
            await asyncio.sleep(0.1)
            task.cancel()
        await eventually(lambda: a.state.stats.cancelled >= 1, timeout=1.0)
        async with aiohttp.ClientSession() as http:
            metrics = await (await fetch(http, "GET", url(server, "/metrics"))).text()
        assert 'olmd_upstream_cancelled_total{node="a"} 1.0' in metrics
        assert 'code="499"' in metrics


async def test_killed_node_fails_over_and_comes_back_within_a_probe_interval(three) -> None:
    a = three[0][2]
    a.state.update({"tokens": 50, "token_delay": 0.02})
    data = settings_dict(three, probe_interval=0.5)
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        gateway = server.app[GATEWAY]
        async with http.post(
            url(server, "/api/generate"), json={"model": MODEL, "prompt": "x"}
        ) as s:
            assert s.headers["X-Olmd-Node"] == "a"
            await s.content.readline()
            await a.stop()  # the node dies mid-stream
            lines = (await s.content.read()).decode().splitlines()
        assert "error" in json.loads(lines[-1])
        assert sum("error" in json.loads(line) for line in lines) == 1
        # Requests not yet started: no client-visible error.
        for _ in range(20):
            status, node, _ = await post(http, server, "/api/generate", GENERATE)
            assert (status, node) == (200, "b")
        await eventually(lambda: gateway.fleet.get("a").health.down, timeout=5)
        await a.start()
        loop = asyncio.get_running_loop()
        back = loop.time()
        await eventually(
            lambda: gateway.fleet.get("a").health.is_routable(
                loop.time() * 0 + __import__("time").monotonic()
            ),
            timeout=2,
        )
        assert loop.time() - back <= 0.5 + 0.1
        seen = {(await post(http, server, "/api/generate", GENERATE))[1] for _ in range(8)}
        assert seen == {"a", "b"}


async def test_reload_changes_weights_without_dropping_a_stream(three) -> None:
    from daemon.runtime import RUNTIME
    from daemon.settings import Settings

    three[1][2].state.update({"tokens": 20, "token_delay": 0.05})
    data = settings_dict(three)
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        runtime = server.app[RUNTIME]
        for _ in range(2):  # weights 3:1 give a, a, b, a
            await post(http, server, "/api/generate", GENERATE)
        async with http.post(
            url(server, "/api/generate"), json={"model": MODEL, "prompt": "x"}
        ) as s:
            assert s.headers["X-Olmd-Node"] == "b"
            await s.content.readline()
            data["services"]["ollama"]["nodes"][0]["weight"] = 1
            await runtime.apply(Settings(**data))
            lines = (await s.content.read()).decode().splitlines()
        assert json.loads(lines[-1])["done"] is True
        seen = Counter(
            [(await post(http, server, "/api/generate", GENERATE))[1] for _ in range(10)]
        )
        assert seen == {"a": 5, "b": 5}


async def test_a_timing_out_node_does_not_delay_the_others_probes(three) -> None:
    # A node that accepts connections and never answers: each probe waits health_timeout.
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()

    silent_server = await asyncio.start_server(silent, "127.0.0.1", 0)
    silent_port = silent_server.sockets[0].getsockname()[1]
    a = three[0][2]
    data = settings_dict(three[:2], probe_interval=0.5)
    data["services"]["ollama"]["health_timeout"] = 3.0
    data["services"]["ollama"]["nodes"].append(
        {"name": "silent", "host": "127.0.0.1", "port": silent_port}
    )
    try:
        async with running_olmd(data) as server:
            fleet = server.app[GATEWAY].fleet
            await a.stop()
            await eventually(lambda: fleet.get("a").health.down, timeout=5)
            await a.start()
            started = time.monotonic()
            await eventually(lambda: fleet.get("a").health.is_routable(time.monotonic()), 3)
            assert time.monotonic() - started < 0.5 + 0.2  # one interval, not health_timeout
    finally:
        for writer in writers:
            writer.close()
        silent_server.close()
        await silent_server.wait_closed()


async def test_a_long_non_streamed_answer_is_not_cut_by_the_first_byte_timeout(three) -> None:
    a = three[0][2]
    a.state.update({"tokens": 5, "token_delay": 0.15})  # streams at once, whole after 0.75 s
    data = settings_dict(three[:1], first_byte_timeout=0.4, non_streaming_timeout=5)
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        status, node, body = await post(http, server, "/api/generate", GENERATE)
        assert (status, node) == (200, "a")
        assert body["done"] is True
        stream = {"model": MODEL, "prompt": "x"}
        async with http.post(url(server, "/api/generate"), json=stream) as s:
            assert s.status == 200
            lines = (await s.content.read()).decode().splitlines()
        assert json.loads(lines[-1])["done"] is True
        a.state.update({"load_delay": 1.0})
        await a.stop()
        await a.start()  # nothing loaded: the next stream waits 1 s for its first byte
        await server.app[GATEWAY].prober.probe_all()
        async with http.post(url(server, "/api/generate"), json=stream) as s:
            assert s.status == 504
            assert "sent nothing in time" in (await s.json())["error"]


async def test_a_pass_through_stream_cut_by_the_node_ends_cleanly(monkeypatch) -> None:
    import pathlib

    from aiohttp import web

    from daemon.settings import load_settings
    from tests.helpers import write_settings

    async def pull(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        await response.write(b'{"status":"pulling manifest"}\n')
        assert request.transport is not None
        request.transport.abort()  # the node dies mid-pull
        return response

    runner, port = await one_node_app(pull=pull)
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", "admin-token-0001")
    data = settings_dict([])
    data["services"]["ollama"]["nodes"] = [{"name": "n", "host": "127.0.0.1", "port": port}]
    admin = {"Authorization": "Bearer admin-token-0001", "X-Olmd-Node": "n"}
    try:
        settings = load_settings(write_settings(pathlib.Path("s.toml"), data))
        async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
            async with asyncio.timeout(5):  # no hanging connection
                async with http.post(
                    url(server, "/api/pull"), json={"model": MODEL}, headers=admin
                ) as response:
                    assert response.status == 200
                    body = await response.read()
    finally:
        await runner.cleanup()
    lines = body.decode().splitlines()
    assert lines[0] == '{"status":"pulling manifest"}'
    assert "HTTP/1.1" not in body.decode()
    assert "error" in json.loads(lines[-1])
