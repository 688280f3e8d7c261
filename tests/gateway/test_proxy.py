"""The proxy against real emulated nodes on loopback: routing, failover, streaming."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import ollama
import openai
import pytest

from daemon.emulator.server import Emulator, EmulatorConfig
from daemon.gateway.component import GATEWAY
from tests.helpers import eventually, fetch, free_port, running_olmd, settings_dict

MODEL = "llama3.1:8b"
GENERATE = {"model": MODEL, "prompt": "hi", "stream": False}


@pytest.fixture
async def three() -> AsyncIterator[list[tuple[str, int, Emulator]]]:
    """Nodes a, b, c with weights 3, 1, 1; c lacks the model."""
    emulators = [
        Emulator(EmulatorConfig(name="a", models=[MODEL, "nomic-embed-text"])),
        Emulator(EmulatorConfig(name="b", models=[MODEL, "nomic-embed-text"])),
        Emulator(EmulatorConfig(name="c", models=["qwen3-coder:30b"])),
    ]
    for emu in emulators:
        await emu.start()
    yield [("a", 3, emulators[0]), ("b", 1, emulators[1]), ("c", 1, emulators[2])]
    for emu in emulators:
        await emu.stop()


def url(server: Any, path: str) -> str:
    return str(server.make_url(path))


async def post(
    http: aiohttp.ClientSession, server: Any, path: str, body: Any
) -> tuple[int, str, Any]:
    async with http.post(url(server, path), json=body) as response:
        data = await response.json(content_type=None)
        return response.status, response.headers.get("X-Olmd-Node", ""), data


async def test_weights_split_exactly_and_skip_nodes_without_the_model(three) -> None:
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
        async with aiohttp.ClientSession() as http:
            seen: Counter[str] = Counter()
            for _ in range(400):
                status, node, _ = await post(http, server, "/api/generate", GENERATE)
                assert status == 200
                seen[node] += 1
    assert seen == {"a": 300, "b": 100}
    assert three[2][2].state.stats.requests.get("/api/generate", 0) == 0


async def test_concurrent_requests_keep_the_weights(three) -> None:
    # Without the in-flight cap: with it, a full node's share goes to the others.
    data = settings_dict(three, prefer_loaded=False, max_in_flight_per_node=0)
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        results = await asyncio.gather(
            *(post(http, server, "/api/chat", {**GENERATE, "messages": []}) for _ in range(200))
        )
    assert Counter(node for _, node, _ in results) == {"a": 150, "b": 50}


async def test_official_clients_work_unchanged(three) -> None:
    async with running_olmd(settings_dict(three)) as server:
        base = str(server.make_url("")).rstrip("/")
        async with ollama.AsyncClient(host=base) as client:
            chat = await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            assert chat.message.content and chat.done
            parts = [p async for p in await client.generate(model=MODEL, prompt="hi", stream=True)]
            assert parts[-1].done and parts[-1].eval_count
            embedded = await client.embed(model="nomic-embed-text", input=["a", "b"])
            assert len(embedded.embeddings) == 2
            listed = await client.list()
            names = {m.model for m in listed.models}
            assert names == {MODEL, "nomic-embed-text:latest", "qwen3-coder:30b"}
            streamed = [c async for c in await client.chat(model=MODEL, messages=[], stream=True)]
            assert streamed[-1].done

        oai = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused")
        completion = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content
        chunks = [
            c
            async for c in await oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        ]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        models = await oai.models.list()
        assert MODEL in {m.id for m in models.data}
        vectors = await oai.embeddings.create(model="nomic-embed-text", input="hi")
        assert vectors.data[0].embedding
        await oai.close()


async def test_merged_views_and_wrapper_routes(three) -> None:
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        tags = await (await http.get(url(server, "/api/tags"))).json()
        by_name = {m["name"]: m for m in tags["models"]}
        assert sorted(by_name[MODEL]["nodes"]) == ["a", "b"]
        assert len(by_name[MODEL]["digest"]) == 64
        version = await (await http.get(url(server, "/api/version"))).json()
        assert version["version"] == "0.12.0" and set(version["nodes"]) == {"a", "b", "c"}
        assert (await fetch(http, "GET", url(server, "/"))).status == 200
        assert (await fetch(http, "HEAD", url(server, "/"))).status == 200

        status, _, data = await post(http, server, "/api/v1/llm/generate", GENERATE)
        assert status == 200 and data["done"] is True and data["response"]
        status, _, data = await post(
            http,
            server,
            "/api/v1/llm/chat",
            {**GENERATE, "messages": [{"role": "user", "content": "x"}]},
        )
        assert status == 200 and data["message"]["content"]
        status, _, data = await post(
            http, server, "/api/v1/llm/embeddings", {"model": "nomic-embed-text", "prompt": "x"}
        )
        assert status == 200 and data["embedding"]
        status, _, data = await post(
            http, server, "/api/v1/llm/embeddings", {"model": "nomic-embed-text", "input": "x"}
        )
        assert status == 200 and data["embeddings"]
        await post(http, server, "/api/generate", GENERATE)
        await server.app[GATEWAY].prober.probe_all()
        ps = await (await http.get(url(server, "/api/ps"))).json()
        assert [m["name"] for m in ps["models"]] == [MODEL, "nomic-embed-text:latest"]


async def test_bad_requests_get_json_errors(three) -> None:
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        status, _, data = await post(
            http, server, "/api/generate", {"model": "nope:1b", "prompt": "x"}
        )
        assert status == 404 and "not found" in data["error"]
        status, _, data = await post(http, server, "/api/generate", {"prompt": "x"})
        assert status == 400 and data["error"] == "model is required"
        status, _, data = await post(http, server, "/api/generate", {"model": "x; rm -rf /"})
        assert status == 400 and "invalid model name" in data["error"]
        status, _, data = await post(http, server, "/v1/chat/completions", {"model": "nope"})
        assert status == 404 and data["error"]["message"]
        async with http.post(url(server, "/api/generate"), data=b"{not json") as response:
            assert response.status == 400
            assert "invalid JSON" in (await response.json())["error"]
        async with http.get(url(server, "/api/nothing-here")) as response:
            assert response.status == 404
            assert "error" in await response.json()
        async with http.get(url(server, "/api/generate")) as response:
            assert response.status == 405
            assert "error" in await response.json()


async def test_request_body_over_the_limit_is_413_and_not_forwarded(three) -> None:
    data = settings_dict(three)
    data["server"]["max_body_bytes"] = 1024
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        body = {"model": MODEL, "prompt": "x" * 4096}
        status, _, error = await post(http, server, "/api/generate", body)
    assert status == 413 and "limit of 1024 bytes" in error["error"]
    assert all(emu.state.stats.requests.get("/api/generate", 0) == 0 for _, _, emu in three)


MANAGEMENT = [
    ("POST", "/api/pull"),
    ("POST", "//api/pull"),
    ("POST", "/api/./pull"),
    ("POST", "/api/x/../pull"),
    ("POST", "/api%2Fpull"),
    ("POST", "/api%252Fpull"),
    ("POST", "/API/PULL"),
    ("POST", "/api/pull;x"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/copy"),
    ("POST", "/api/blobs/sha256:abc"),
    ("HEAD", "/api/blobs/sha256:abc"),
    ("POST", "/admin/nodes/a/drain"),
]


@pytest.mark.parametrize(("method", "path"), MANAGEMENT)
async def test_management_routes_are_refused_without_reaching_a_node(three, method, path) -> None:
    data = settings_dict(three)
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        target = str(server.make_url("")).rstrip("/") + path
        async with http.request(
            method,
            aiohttp.client.URL(target, encoded=True),
            json={"model": MODEL},
            headers={"Authorization": "Bearer wrong-token-123"},
        ) as response:
            assert response.status == 403
            if method != "HEAD":
                assert "error" in await response.json()
    for _, _, emu in three:
        assert not any(r in emu.state.stats.requests for r in ("/api/pull", "/api/delete"))


async def test_keys_and_admin_token(three, monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.settings import load_settings
    from tests.helpers import write_settings

    monkeypatch.setenv("OLMD_API_KEYS", "client-key-0001,client-key-0002")
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", "admin-token-0001")
    import pathlib

    path = write_settings(pathlib.Path("s.toml"), settings_dict(three))
    async with running_olmd(load_settings(path)) as server, aiohttp.ClientSession() as http:
        status, _, data = await post(http, server, "/api/generate", GENERATE)
        assert status == 401 and "API key" in data["error"]
        for key in ("client-key-0002", "admin-token-0001"):
            async with http.post(
                url(server, "/api/generate"),
                json=GENERATE,
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                assert response.status == 200
        async with http.get(
            url(server, "/admin/nodes"), headers={"Authorization": "Bearer client-key-0001"}
        ) as response:
            assert response.status == 403
        admin = {"Authorization": "Bearer admin-token-0001"}
        async with http.get(url(server, "/admin/nodes"), headers=admin) as response:
            nodes = (await response.json())["nodes"]
            assert [n["name"] for n in nodes] == ["a", "b", "c"]
            assert nodes[0]["state"] == "healthy" and MODEL in nodes[0]["models"]
            assert "admin-token" not in json.dumps(nodes)
        # With the token and a named node, a pull goes to that node only.
        async with http.post(
            url(server, "/api/pull"),
            json={"model": "tinyllama", "stream": False},
            headers={**admin, "X-Olmd-Node": "b"},
        ) as response:
            assert response.status == 200
            assert response.headers["X-Olmd-Node"] == "b"
        assert "tinyllama:latest" in three[1][2].state.config.models
        assert three[0][2].state.stats.requests.get("/api/pull", 0) == 0
        assert (await fetch(http, "GET", url(server, "/metrics"))).status == 200
        assert (await fetch(http, "GET", url(server, "/healthz"))).status == 200


async def test_drain_stops_new_requests_but_lets_a_stream_finish(three) -> None:
    three[0][2].state.update({"tokens": 10, "token_delay": 0.05})
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
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
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
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
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
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
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
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
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
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
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
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
    data = settings_dict(three, prefer_loaded=False, probe_interval=0.5)
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
    data = settings_dict(three, prefer_loaded=False)
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


async def test_metrics_count_requests_tokens_and_node_state(three) -> None:
    async with running_olmd(settings_dict(three, prefer_loaded=False)) as server:
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                await post(http, server, "/api/generate", GENERATE)
            async with http.post(
                url(server, "/api/generate"), json={"model": MODEL, "prompt": "x"}
            ) as s:
                await s.read()
            text = await (await http.get(url(server, "/metrics"))).text()
    assert (
        'olmd_requests_total{code="200",endpoint="/api/generate",model="llama3.1:8b",node="a"} 4.0'
        in text
    )
    assert 'olmd_tokens_total{direction="out",model="llama3.1:8b",node="a"} 32.0' in text
    assert 'olmd_node_state{node="c",state="healthy"} 1.0' in text
    assert "olmd_time_to_first_byte_seconds_bucket" in text
    assert "olmd_generation_tokens_per_second_count" in text
    assert 'olmd_node_models{node="a"} 2.0' in text


async def _raw_request(port: int, request_line: str, headers: str = "") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"{request_line}\r\nHost: x\r\n{headers}Content-Length: 2\r\n"
            "Connection: close\r\n\r\n{}".encode()
        )
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    status = int(data.split(b" ", 2)[1])
    return status, data


async def test_absolute_form_request_lines_are_judged_like_paths(
    three, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pathlib

    from daemon.settings import load_settings
    from tests.helpers import write_settings

    monkeypatch.setenv("OLMD_ADMIN_TOKEN", "admin-token-0001")
    path = write_settings(pathlib.Path("s.toml"), settings_dict(three))
    async with running_olmd(load_settings(path)) as server:
        port = server.port
        for line in (
            "GET http://x/admin/nodes HTTP/1.1",
            "POST http://x/admin/nodes/a/drain HTTP/1.1",
            "POST http://x/admin/sync HTTP/1.1",
            "POST http://x/api/pull HTTP/1.1",
            "POST http://x//api/./pull HTTP/1.1",
        ):
            status, _ = await _raw_request(port, line, "Authorization: Bearer wrong\r\n")
            assert status == 403, line
        assert server.app[GATEWAY].fleet.get("a").health.draining is False
        status, body = await _raw_request(
            port, "GET http://x/admin/nodes HTTP/1.1", "Authorization: Bearer admin-token-0001\r\n"
        )
        assert status == 200
        assert b'"nodes"' in body


async def test_management_with_a_wrong_token_or_a_dead_node(three, monkeypatch) -> None:
    import pathlib

    from daemon.settings import load_settings
    from tests.helpers import write_settings

    monkeypatch.setenv("OLMD_ADMIN_TOKEN", "admin-token-0001")
    path = write_settings(pathlib.Path("s.toml"), settings_dict(three))
    async with running_olmd(load_settings(path)) as server, aiohttp.ClientSession() as http:
        for method, route in MANAGEMENT:
            headers = {"Authorization": "Bearer admin-token-0002", "X-Olmd-Node": "a"}
            target = url(server, "/") + route.lstrip("/")
            response = await fetch(http, method, target, headers=headers)
            assert response.status in (403, 404), route  # 404: an unroutable spelling
        await three[1][2].stop()
        admin = {"Authorization": "Bearer admin-token-0001", "X-Olmd-Node": "b"}
        async with http.post(url(server, "/api/pull"), json={"model": "x"}, headers=admin) as r:
            assert r.status == 502
            assert "node b" in (await r.json())["error"]
    for _, _, emu in three[:1]:
        assert emu.state.stats.requests.get("/api/pull", 0) == 0


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


async def test_forwarded_headers_keep_credentials_and_hop_by_hop_out(monkeypatch) -> None:
    """A node that answers with the headers it received."""
    import pathlib

    from aiohttp import web

    from daemon.settings import load_settings
    from tests.helpers import write_settings

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"headers": dict(request.headers), "done": True})

    runner, port = await _one_node_app(generate=echo)
    monkeypatch.setenv("OLMD_API_KEYS", "client-key-0001")
    data = settings_dict([])
    data["services"]["ollama"]["nodes"] = [{"name": "echo", "host": "127.0.0.1", "port": port}]
    try:
        settings = load_settings(write_settings(pathlib.Path("s.toml"), data))
        async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
            sent = {
                "Authorization": "Bearer client-key-0001",
                "Cookie": "session=1",
                "X-Forwarded-For": "10.1.2.3",
                "X-Request-Id": "abc-123",
                "Proxy-Authorization": "Basic eA==",
            }
            async with http.post(
                url(server, "/api/generate"),
                json=GENERATE,
                headers=sent,
                skip_auto_headers=("Accept-Encoding",),
            ) as response:
                seen = {k.lower(): v for k, v in (await response.json())["headers"].items()}
    finally:
        await runner.cleanup()
    assert "authorization" not in seen
    assert "cookie" not in seen
    assert "proxy-authorization" not in seen
    assert "accept-encoding" not in seen  # nothing the client did not send
    assert seen["x-request-id"] == "abc-123"
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"


async def _one_node_app(**posts: Any) -> tuple[Any, int]:
    """A hand-made node: Ollama's probe routes, plus ``posts`` ({"pull": handler})."""
    from aiohttp import web

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": "0.12.0"})

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": MODEL, "model": MODEL}]})

    async def ps(request: web.Request) -> web.Response:
        return web.json_response({"models": []})

    app = web.Application()
    app.router.add_get("/api/version", version)
    app.router.add_get("/api/tags", tags)
    app.router.add_get("/api/ps", ps)
    for name, handler in posts.items():
        app.router.add_post(f"/api/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


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

    runner, port = await _one_node_app(pull=pull)
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


async def test_a_secret_node_address_stays_out_of_errors_and_admin(monkeypatch) -> None:
    from daemon.settings import load_settings

    dead = free_port()  # nothing listens: probes fail with the address in the error
    monkeypatch.setenv("OLLAMA_REMOTE_HOST", "127.0.0.1")
    monkeypatch.setenv("OLLAMA_REMOTE_PORT", str(dead))
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", "admin-token-0001")
    settings = load_settings()
    async with running_olmd(settings) as server, aiohttp.ClientSession() as http:
        admin = {"Authorization": "Bearer admin-token-0001"}
        async with http.get(url(server, "/admin/nodes"), headers=admin) as response:
            text = await response.text()
        async with http.post(
            url(server, "/api/pull"),
            json={"model": MODEL},
            headers={**admin, "X-Olmd-Node": "ollama"},
        ) as response:
            pull_text = await response.text()
    [node] = json.loads(text)["nodes"]
    assert node["name"] == "ollama"
    assert node["last_error"] and "ollama" in node["last_error"]
    for shown in (text, pull_text):
        assert "127.0.0.1" not in shown
        assert str(dead) not in shown


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/blobs/%2e%2e%2f%2e%2e"),
        ("POST", "/admin/nodes/x%2f..%2f..%2f..%2fhealthz/drain"),
        ("POST", "/admin/nodes/%2e%2e/drain"),
    ],
)
async def test_the_guard_judges_the_route_the_router_matched(three, method, path) -> None:
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        target = aiohttp.client.URL(str(server.make_url("")).rstrip("/") + path, encoded=True)
        async with http.request(method, target) as response:
            assert response.status == 403
            # Refused by the front door itself, not by a handler's own check.
            assert "disabled: set OLMD_ADMIN_TOKEN" in (await response.json())["error"]
