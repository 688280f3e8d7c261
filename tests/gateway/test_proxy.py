"""The proxy against real emulated nodes on loopback: routing, merged views, clients, metrics."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import ollama
import openai

from daemon.gateway.component import GATEWAY
from tests.gateway.support import GENERATE, MODEL, one_node_app, post, url
from tests.helpers import fetch, running_olmd, settings_dict


async def test_weights_split_exactly_and_skip_nodes_without_the_model(three) -> None:
    async with running_olmd(settings_dict(three)) as server:
        async with aiohttp.ClientSession() as http:
            seen: Counter[str] = Counter()
            for _ in range(400):
                status, node, _ = await post(http, server, "/api/generate", GENERATE)
                assert status == 200
                seen[node] += 1
    assert seen == {"a": 300, "b": 100}
    assert three[2][2].state.stats.requests.get("/api/generate", 0) == 0


async def test_concurrent_requests_keep_the_weights(three) -> None:
    # With slots for all of them: a node with no free slot has its share go to the others.
    data = settings_dict(three, parallel=256)
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


async def test_metrics_count_requests_tokens_and_node_state(three) -> None:
    async with running_olmd(settings_dict(three)) as server:
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


async def test_forwarded_headers_keep_credentials_and_hop_by_hop_out(monkeypatch) -> None:
    """A node that answers with the headers it received."""
    import pathlib

    from aiohttp import web

    from daemon.settings import load_settings
    from tests.helpers import write_settings

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"headers": dict(request.headers), "done": True})

    runner, port = await one_node_app(generate=echo)
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
