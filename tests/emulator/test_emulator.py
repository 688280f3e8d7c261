"""The Ollama emulator against the official clients and raw HTTP, on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import signal
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionUserMessageParam

from daemon.emulator import formats as fmt
from daemon.emulator.server import (
    STATE_KEY,
    Emulator,
    EmulatorConfig,
    add_arguments,
    create_app,
    run_from_args,
)

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


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(models=MODELS)) as emulator:
        yield emulator


@pytest.fixture
async def ollama_client(emu: Emulator) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=emu.url) as client:
        yield client


@pytest.fixture
async def openai_client(emu: Emulator) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=emu.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


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


# ---------------------------------------------------------------- official clients


async def test_ollama_client_chat_generate_embed_list_show(
    ollama_client: ollama.AsyncClient,
) -> None:
    client = ollama_client
    reply = await client.chat(model="llama3.1:8b", messages=QUESTION)
    assert reply.done and reply.done_reason == "stop"
    assert reply.message.role == "assistant" and len(reply.message.content or "") > 0
    assert reply.eval_count == 8 and (reply.eval_duration or 0) > 0

    parts = [p async for p in await client.chat("llama3.1:8b", QUESTION, stream=True)]
    assert [p.done for p in parts] == [False] * 8 + [True]
    assert "".join(p.message.content or "" for p in parts) == reply.message.content

    generated = await client.generate(model="llama3.1:8b", prompt="Why is the sky blue?")
    assert generated.response == reply.message.content and generated.context
    chunks = [c async for c in await client.generate("llama3.1:8b", "hello", stream=True)]
    assert chunks[-1].done and chunks[-1].context and not chunks[-1].response
    assert "".join(c.response or "" for c in chunks[:-1]).strip()

    embedded = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 8
    again = await client.embed(model="nomic-embed-text", input="a")
    assert again.embeddings[0] == embedded.embeddings[0]  # deterministic
    legacy = await client.embeddings(model="nomic-embed-text", prompt="a")
    assert len(legacy.embedding) == 8

    listed = await client.list()
    assert {m.model for m in listed.models} == {"llama3.1:8b", "nomic-embed-text:latest"}
    shown = await client.show("llama3.1:8b")
    assert shown.capabilities == ["completion"] and shown.details
    assert shown.details.family == "llama"
    running = await client.ps()
    assert {m.model for m in running.models} == {"llama3.1:8b", "nomic-embed-text:latest"}

    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat(model="absent", messages=QUESTION)
    assert missing.value.status_code == 404
    assert missing.value.error == "model 'absent' not found"


async def test_ollama_client_pull_reports_progress_then_lists(
    emu: Emulator, ollama_client: ollama.AsyncClient
) -> None:
    emu.state.update({"pull_size": 40_000, "pull_speed": 400_000})
    client = ollama_client
    statuses: list[str] = []
    completed: list[int] = []
    async for progress in await client.pull("qwen3:0.6b", stream=True):
        statuses.append(progress.status or "")
        completed.append(progress.completed or 0)
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = [s for s in statuses if s.startswith("pulling ") and s != "pulling manifest"]
    assert len(set(layers)) == 2 and all(len(s) == len("pulling ") + 12 for s in layers)
    assert len(layers) > 3  # rate limited: several progress lines per layer
    assert max(completed) == 36_000
    assert "qwen3:0.6b" in {m.model for m in (await client.list()).models}

    result = await client.pull("qwen3:0.6b")  # already present: cache hits, one object
    assert result.status == "success"
    emu.state.update({"unavailable": ["nonesuch"]})
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        await drain(await client.pull("nonesuch", stream=True))


async def test_openai_client_chat_completions_embeddings_models(
    openai_client: openai.AsyncOpenAI,
) -> None:
    client = openai_client
    chat = await client.chat.completions.create(model="llama3.1:8b", messages=QUESTION)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].finish_reason == "stop"
    assert chat.usage is not None and chat.usage.completion_tokens == 8

    stream = await client.chat.completions.create(
        model="llama3.1:8b",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 8

    done = await client.completions.create(model="llama3.1:8b", prompt="hi", max_tokens=3)
    assert done.object == "text_completion" and done.choices[0].finish_reason == "length"
    streamed = await client.completions.create(model="llama3.1:8b", prompt="hi", stream=True)
    pieces = [piece async for piece in streamed]
    assert {p.object for p in pieces} == {"text_completion"}
    assert pieces[-1].choices[0].finish_reason == "stop"

    vectors = await client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [d.index for d in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 8
    packed = await client.embeddings.create(
        model="nomic-embed-text", input="a", encoding_format="base64"
    )
    raw: Any = packed.data[0].embedding  # the client may leave base64 undecoded
    unpacked = struct.unpack("<8f", base64.b64decode(raw)) if isinstance(raw, str) else raw
    assert unpacked == pytest.approx(vectors.data[0].embedding, abs=1e-6)

    models = [m async for m in client.models.list()]
    assert {m.id for m in models} == {"llama3.1:8b", "nomic-embed-text:latest"}
    assert {m.owned_by for m in models} == {"library"}

    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="absent", messages=QUESTION)


# ---------------------------------------------------------------- wire formats


async def test_root_version_and_head(emu: Emulator, http: aiohttp.ClientSession) -> None:
    assert await call(http, emu, "/", method="GET") == (
        200,
        "text/plain; charset=utf-8",
        "Ollama is running",
    )
    async with http.head(emu.url + "/") as resp:
        assert resp.status == 200
    status, kind, text = await call(http, emu, "/api/version", method="GET")
    assert (status, kind, json.loads(text)) == (
        200,
        "application/json; charset=utf-8",
        {"version": "0.12.0"},
    )


async def test_tags_fields_and_digests(emu: Emulator, http: aiohttp.ClientSession) -> None:
    _, _, text = await call(http, emu, "/api/tags", method="GET")
    models = json.loads(text)["models"]
    for entry in models:
        assert list(entry) == ["name", "model", "modified_at", "size", "digest", "details"]
        assert entry["name"] == entry["model"] and HEX64.match(entry["digest"])
        assert isinstance(entry["size"], int) and entry["size"] > 0
        assert datetime.fromisoformat(entry["modified_at"]).tzinfo is not None
        assert set(entry["details"]) == {
            "parent_model",
            "format",
            "family",
            "families",
            "parameter_size",
            "quantization_level",
        }
    by_name = {m["name"]: m for m in models}
    assert by_name["llama3.1:8b"]["details"]["parameter_size"] == "8.0B"

    other = "ab" * 32
    same = EmulatorConfig(models=["llama3.1:8b"])
    differs = EmulatorConfig(models=["llama3.1:8b"], digests={"llama3.1:8b": other})
    async with Emulator(same) as twin, Emulator(differs) as odd:
        twin_tags = json.loads((await call(http, twin, "/api/tags", method="GET"))[2])
        odd_tags = json.loads((await call(http, odd, "/api/tags", method="GET"))[2])
    assert twin_tags["models"][0]["digest"] == by_name["llama3.1:8b"]["digest"]
    assert odd_tags["models"][0]["digest"] == other


async def test_generate_stream_fields(emu: Emulator, http: aiohttp.ClientSession) -> None:
    body = {"model": "llama3.1", "prompt": "hi", "options": {"num_predict": 3}}
    emu.state.update({"models": ["llama3.1"]})  # stored as llama3.1:latest
    status, kind, text = await call(http, emu, "/api/generate", body)
    assert (status, kind) == (200, "application/x-ndjson")
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 4
    for line in lines[:-1]:
        assert list(line) == ["model", "created_at", "response", "done"]
        assert line["model"] == "llama3.1" and line["done"] is False
        assert line["created_at"].endswith("Z")
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["response"] == "" and all(isinstance(i, int) for i in final["context"])
    assert all(isinstance(final[k], int) and final[k] > 0 for k in DURATIONS)
    assert final["eval_count"] == 3

    status, kind, text = await call(http, emu, "/api/generate", {**body, "stream": False})
    assert (status, kind) == (200, "application/json; charset=utf-8")
    single = json.loads(text)
    assert single["response"] == "".join(line["response"] for line in lines)


async def test_chat_final_chunk(emu: Emulator, http: aiohttp.ClientSession) -> None:
    _, _, text = await call(http, emu, "/api/chat", CHAT)
    *tokens, final = [json.loads(line) for line in text.splitlines()]
    assert tokens[0]["message"] == {"role": "assistant", "content": tokens[0]["message"]["content"]}
    assert final["message"] == {"role": "assistant", "content": ""}
    assert final["done_reason"] == "stop" and "context" not in final
    assert all(isinstance(final[k], int) for k in DURATIONS)


async def test_load_and_unload_with_empty_prompt(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    status, _, text = await call(http, emu, "/api/generate", {"model": "llama3.1:8b"})
    assert status == 200 and json.loads(text)["done_reason"] == "load"
    assert "llama3.1:8b" in emu.state.loaded
    unload = {"model": "llama3.1:8b", "messages": [], "keep_alive": 0}
    status, _, text = await call(http, emu, "/api/chat", unload)
    assert json.loads(text)["done_reason"] == "unload" and not emu.state.loaded


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ("/api/chat", {"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        ("/api/generate", {"prompt": "x"}, 400, "model is required"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/generate", None, 400, "missing request body"),
        ("/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
        ("/api/delete", {"model": "nope"}, 404, "model 'nope' not found"),
        (
            "/api/embed",
            {"model": "nope", "input": "x"},
            404,
            'model "nope" not found, try pulling it first',
        ),
        (
            "/api/generate",
            {"model": "nomic-embed-text", "prompt": "x"},
            400,
            '"nomic-embed-text" does not support generate',
        ),
        ("/api/pull", {"model": ""}, 400, "invalid model name"),
    ],
)
async def test_ollama_error_bodies(
    emu: Emulator, http: aiohttp.ClientSession, path: str, body: Any, status: int, error: str
) -> None:
    method = "DELETE" if path == "/api/delete" else "POST"
    got, kind, text = await call(http, emu, path, body, method=method)
    assert (got, kind, json.loads(text)) == (
        status,
        "application/json; charset=utf-8",
        {"error": error},
    )


async def test_openai_error_bodies(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, kind, text = await call(http, emu, "/v1/chat/completions", {"model": "nope"})
    assert (status, kind) == (400, "application/json")
    assert json.loads(text) == {
        "error": {
            "message": "[] is too short - 'messages'",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    status, _, text = await call(http, emu, "/v1/chat/completions", CHAT | {"model": "nope"})
    assert status == 404 and json.loads(text)["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/v1/completions",
            {"model": "llama3.1:8b", "prompt": ["a"]},
            "json: cannot unmarshal array into Go value of type string",
        ),
        ("/v1/embeddings", {"model": "nomic-embed-text", "input": []}, "invalid input"),
        (
            "/v1/embeddings",
            {"model": "nomic-embed-text", "input": "x", "encoding_format": "hex"},
            "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64'].",
        ),
    ],
)
async def test_openai_bad_requests(
    emu: Emulator, http: aiohttp.ClientSession, path: str, body: Any, message: str
) -> None:
    status, _, text = await call(http, emu, path, body)
    assert status == 400 and json.loads(text)["error"]["message"] == message


async def test_openai_model_lookup(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, kind, text = await call(http, emu, "/v1/models/llama3.1:8b", method="GET")
    assert (status, kind) == (200, "application/json")
    assert json.loads(text)["id"] == "llama3.1:8b"
    status, _, _ = await call(http, emu, "/v1/models/absent", method="GET")
    assert status == 404
    await configure(http, emu, models=[])
    _, _, text = await call(http, emu, "/v1/models", method="GET")
    assert json.loads(text) == {"object": "list", "data": None}  # as Go marshals a nil slice


async def test_delete_then_absent(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, _, text = await call(http, emu, "/api/delete", {"model": "nomic-embed-text"}, "DELETE")
    assert (status, text) == (200, "")
    _, _, tags = await call(http, emu, "/api/tags", method="GET")
    assert [m["name"] for m in json.loads(tags)["models"]] == ["llama3.1:8b"]


async def test_cold_load_delays_first_token_once(
    emu: Emulator, ollama_client: ollama.AsyncClient
) -> None:
    emu.state.update({"load_delay": 0.2})
    client = ollama_client
    assert not (await client.ps()).models
    first = await client.generate(model="llama3.1:8b", prompt="x")
    second = await client.generate(model="llama3.1:8b", prompt="x")
    assert (first.load_duration or 0) >= 200_000_000
    assert (second.load_duration or 0) < 100_000_000
    running = (await client.ps()).models
    assert [m.model for m in running] == ["llama3.1:8b"]
    assert running[0].expires_at is not None and running[0].size_vram


# ---------------------------------------------------------------- behaviour


async def test_busy_queue_answers_503(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, concurrency=1, queue=0, tokens=20, token_delay=0.01)
    first = asyncio.create_task(call(http, emu, "/api/chat", CHAT))
    await until(lambda: _in_flight(emu, 1))
    status, kind, text = await call(http, emu, "/api/chat", CHAT)
    assert (status, kind, json.loads(text)) == (
        503,
        "application/json; charset=utf-8",
        {"error": BUSY},
    )
    assert (await first)[0] == 200

    await configure(http, emu, queue=1)
    both = await asyncio.gather(*(call(http, emu, "/api/chat", CHAT) for _ in range(2)))
    assert [b[0] for b in both] == [200, 200]
    seen = await stats(http, emu)
    assert seen["max_in_flight"] == 1 and seen["rejected"] == 1 and seen["in_flight"] == 0


async def _in_flight(emu: Emulator, count: int) -> bool:
    return emu.state.stats.in_flight == count


async def test_client_disconnect_counted_within_a_second(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, tokens=200, token_delay=0.05)
    async with http.post(emu.url + "/api/chat", json=CHAT) as resp:
        await resp.content.readline()
        await resp.content.readline()
        resp.close()  # the client walks away mid-stream
    await until(lambda: _cancelled(emu, 1), timeout=1.0)
    assert emu.state.stats.in_flight == 0 and emu.state.stats.completed == 0


async def _cancelled(emu: Emulator, count: int) -> bool:
    return emu.state.stats.cancelled == count


async def test_disconnect_seen_without_handler_cancellation(
    http: aiohttp.ClientSession,
) -> None:
    app = create_app(EmulatorConfig(tokens=200, token_delay=0.05))
    runner = web.AppRunner(app)  # aiohttp's default: handlers are not cancelled
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        async with http.post(f"http://127.0.0.1:{port}/api/chat", json=CHAT) as resp:
            await resp.content.readline()
            resp.close()
        state = app[STATE_KEY]
        for _ in range(100):
            if state.stats.cancelled:
                break
            await asyncio.sleep(0.01)
        assert state.stats.cancelled == 1 and state.stats.in_flight == 0
    finally:
        await runner.cleanup()


async def test_pull_resumes_after_disconnect(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, pull_size=100_000, pull_speed=200_000)
    async with http.post(emu.url + "/api/pull", json={"model": "gemma3:1b"}) as resp:
        for _ in range(50):
            line = json.loads(await resp.content.readline())
            if line.get("completed", 0) > 10_000:
                break
        resp.close()
    await until(lambda: _cancelled(emu, 1))
    assert "gemma3:1b" not in {m["name"] for m in await _tags(http, emu)}

    async with http.post(emu.url + "/api/pull", json={"name": "gemma3:1b"}) as resp:
        lines = [json.loads(line) async for line in resp.content]
    assert lines[1]["completed"] > 10_000  # started where the last pull stopped
    assert lines[-1] == {"status": "success"}
    assert "gemma3:1b" in {m["name"] for m in await _tags(http, emu)}
    assert emu.state.stats.max_pulls_in_flight == 1


async def _tags(http: aiohttp.ClientSession, emu: Emulator) -> list[dict[str, Any]]:
    models: list[dict[str, Any]] = json.loads(
        (await call(http, emu, "/api/tags", method="GET"))[2]
    )["models"]
    return models


async def test_pull_errors_in_stream(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, unavailable=["ghost"])
    status, kind, text = await call(http, emu, "/api/pull", {"model": "ghost"})
    assert (status, kind) == (200, "application/x-ndjson")
    assert [json.loads(line) for line in text.splitlines()] == [
        {"status": "pulling manifest"},
        {"error": "pull model manifest: file does not exist"},
    ]
    status, _, text = await call(http, emu, "/api/pull", {"model": "ghost", "stream": False})
    assert status == 500 and "file does not exist" in text
    status, _, text = await call(http, emu, "/api/pull", {"model": "x:1b", "stream": False})
    assert (status, json.loads(text)) == (200, {"status": "success"})


# ---------------------------------------------------------------- faults


async def test_fault_refuse_closes_without_answer(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, fault="refuse")
    with pytest.raises(aiohttp.ClientError):
        await call(http, emu, "/api/chat", CHAT)
    assert (await call(http, emu, "/api/tags", method="GET"))[0] == 200  # not a generating route


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [("http500", 500, "llama runner process has terminated"), ("http503", 503, BUSY)],
)
async def test_fault_http_status(
    emu: Emulator, http: aiohttp.ClientSession, fault: str, status: int, error: str
) -> None:
    await configure(http, emu, fault=fault, fault_count=1)
    got, _, text = await call(http, emu, "/api/generate", {"model": "llama3.1:8b", "prompt": "x"})
    assert got == status and json.loads(text)["error"].startswith(error)
    assert (await call(http, emu, "/api/chat", CHAT))[0] == 200  # fault_count=1 used up
    config = json.loads((await call(http, emu, "/_emulator/config", method="GET"))[2])
    assert (config["fault"], config["fault_count"]) == ("none", 0)

    await configure(http, emu, fault=fault)
    got, _, text = await call(http, emu, "/v1/chat/completions", CHAT)
    assert got == status and json.loads(text)["error"]["message"].startswith(error)


async def test_fault_stall_hangs_until_client_leaves(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, fault="stall")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(http, emu, "/api/chat", CHAT), timeout=0.2)
    await until(lambda: _cancelled(emu, 1))


async def test_fault_cut_drops_mid_stream(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, fault="cut", fault_after=2)
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_lines(http, emu.url + "/api/chat", CHAT, received)
    assert len(received) == 2

    with pytest.raises(aiohttp.ClientPayloadError):
        await call(http, emu, "/api/chat", CHAT | {"stream": False})


async def test_fault_error_line(
    emu: Emulator, http: aiohttp.ClientSession, openai_client: openai.AsyncOpenAI
) -> None:
    await configure(http, emu, fault="error_line", fault_after=3)
    status, _, text = await call(http, emu, "/api/chat", CHAT)
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and len(lines) == 4
    assert lines[-1] == {"error": "llama runner process has terminated: exit status 2"}

    stream = await openai_client.chat.completions.create(
        model="llama3.1:8b", messages=QUESTION, stream=True
    )
    with pytest.raises(openai.APIError):
        await drain(stream)

    status, _, text = await call(
        http, emu, "/api/embed", {"model": "nomic-embed-text", "input": "x"}
    )
    assert status == 500 and "error" in json.loads(text)


async def test_fault_limited_to_routes(emu: Emulator, http: aiohttp.ClientSession) -> None:
    await configure(http, emu, fault="error_line", fault_routes=["/api/pull"], fault_after=1)
    assert (await call(http, emu, "/api/chat", CHAT))[0] == 200
    _, _, text = await call(http, emu, "/api/pull", {"model": "phi3:mini"})
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines == [
        {"status": "pulling manifest"},
        {"error": "max retries exceeded: unexpected EOF"},
    ]


# ---------------------------------------------------------------- control and lifecycle


async def test_control_endpoint(emu: Emulator, http: aiohttp.ClientSession) -> None:
    status, _, text = await call(http, emu, "/_emulator/config", {"tokens": 3, "models": ["a"]})
    assert status == 200 and json.loads(text)["models"] == ["a:latest"]
    _, _, text = await call(http, emu, "/api/chat", CHAT | {"model": "a", "stream": False})
    assert json.loads(text)["eval_count"] == 3

    for bad in ({"tokens": -1}, {"fault": "explode"}, {"bogus": 1}, {"digests": {"a": "xyz"}}):
        status, _, text = await call(http, emu, "/_emulator/config", bad)
        assert status == 400 and next(iter(bad)) in json.loads(text)["error"]
    assert emu.state.config.tokens == 3  # a rejected update changes nothing

    seen = await stats(http, emu)
    assert seen["requests"]["/api/chat"] == 1 and seen["completed"] == 1
    status, _, text = await call(http, emu, "/_emulator/reset")
    assert status == 200 and json.loads(text)["requests"] == {}
    assert (await stats(http, emu))["completed"] == 0


async def test_stop_and_start_on_same_port(emu: Emulator, http: aiohttp.ClientSession) -> None:
    port = emu.port
    await emu.stop()
    await emu.stop()  # idempotent
    with pytest.raises(aiohttp.ClientConnectionError):
        await call(http, emu, "/", method="GET")
    await emu.start()
    assert emu.port == port and emu.url == f"http://127.0.0.1:{port}"
    assert (await call(http, emu, "/api/chat", CHAT))[0] == 200


async def test_stop_mid_stream_is_not_a_client_cancellation(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    await configure(http, emu, tokens=200, token_delay=0.05)
    received: list[bytes] = []

    async def stop_after_first(line: bytes) -> None:
        if not received:
            await asyncio.wait_for(emu.stop(), timeout=2)

    with pytest.raises(aiohttp.ClientPayloadError):
        await read_lines(http, emu.url + "/api/chat", CHAT, received, stop_after_first)
    assert len(received) == 1 and emu.state.stats.cancelled == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, 300.0), (10, 10.0), ("5m", 300.0), ("1h30m", 5400.0), ("0", 0.0), ("soon", 300.0)],
)
def test_keep_alive_parsing(value: Any, seconds: float) -> None:
    assert fmt.keep_alive_seconds(value) == seconds
    assert fmt.keep_alive_seconds(-1) > 365 * 24 * 3600  # negative: loaded for ever


def test_config_normalises_and_validates() -> None:
    config = EmulatorConfig(
        models=["llama3", "LLAMA3:latest", "user/x:7b"], digests={"Llama3": "sha256:" + "A" * 64}
    )
    assert config.models == ["llama3:latest", "user/x:7b"]
    assert config.digests == {"llama3:latest": "a" * 64}
    with pytest.raises(ValueError, match="fault_routes"):
        EmulatorConfig(fault_routes=["/api/tags"])


def test_cli_arguments_build_a_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.tokens, args.fault) == ("127.0.0.1", 11434, 8, "none")
    args = parser.parse_args(["--port", "0", "--models", "llama3", "--fault", "cut"])
    assert args.models == ["llama3"] and args.fault == "cut"
    with pytest.raises(SystemExit):
        parser.parse_args(["--fault", "explode"])
    bad = parser.parse_args(["--tokens", "-5"])
    assert run_from_args(bad) == 2


async def test_cli_serves_until_sigterm() -> None:
    script = (
        "import argparse, sys\n"
        "from daemon.emulator.server import add_arguments, run_from_args\n"
        "p = argparse.ArgumentParser(); add_arguments(p)\n"
        "sys.exit(run_from_args(p.parse_args(sys.argv[1:])))\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "--port", "0", "--name", "cli-node", "--models", "llama3",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode()
        url = line.rsplit(" ", 1)[-1].strip()
        assert "cli-node" in line and url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(url + "/api/tags") as resp:
            assert (await resp.json())["models"][0]["name"] == "llama3:latest"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
