"""The routes Ollama added, through olmd against the emulator: OpenAI's Responses API and
audio transcriptions (a multipart form, routed by its ``model`` field) with the real
``openai`` client; ``HEAD`` on every ``GET`` route; and bodies that reach the node byte
for byte (``think``, ``truncate``, ``shift``, ``logprobs``, fields olmd does not know)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL, one_node_app
from tests.helpers import running_olmd, settings_dict

KEY = "routes-key-for-tests"
AUDIO = ("clip.wav", b"RIFF" + bytes(2000), "audio/wav")


@pytest.fixture
async def olmd(three, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("OLMD_API_KEYS", KEY)
    data = settings_dict(three)
    data["server"]["max_body_bytes"] = 4000
    async with running_olmd(data) as server:
        yield server


def _client(server: Any) -> openai.AsyncOpenAI:
    base = str(server.make_url("/v1")).rstrip("/")
    return openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0)


async def test_responses_whole_and_streamed(olmd) -> None:
    async with _client(olmd) as client:
        response = await client.responses.create(model=MODEL, input="hi", instructions="brief")
        assert response.status == "completed" and response.output_text
        assert response.instructions == "brief" and response.usage.output_tokens > 0
        stream = await client.responses.create(
            model=MODEL, input=[{"role": "user", "content": "hi"}], stream=True
        )
        kinds, text = [], ""
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert kinds[-1] == "response.completed" and text
        assert event.response.output_text == text
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(model="nope:1b", input="hi")
        assert caught.value.code == "model_not_found"


async def test_a_cut_responses_stream_ends_with_an_error_event(olmd, three) -> None:
    for _, _, emu in three:
        emu.state.update({"fault": "cut", "fault_after": 3})
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "input": "hi", "stream": True}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(olmd.make_url("/v1/responses"), json=body) as response:
            text = (await response.read()).decode()
    events = [line for line in text.split("\n") if line.startswith("event: ")]
    assert events[0] == "event: response.created"
    assert events[-1] == "event: error" and events.count("event: error") == 1
    last = json.loads(text.rstrip().rsplit("data: ", 1)[1])
    assert last["type"] == "error" and "stream cut" in last["message"]


async def test_transcriptions_are_routed_by_the_form_model(olmd, three) -> None:
    async with _client(olmd) as client:
        # Only node c holds this model: the form's field, not a JSON body, chose it.
        raw = await client.audio.transcriptions.with_raw_response.create(
            model="qwen3-coder:30b", file=AUDIO
        )
        assert raw.headers["X-Olmd-Node"] == "c"
        assert raw.parse().text
        text = await client.audio.transcriptions.create(
            model=MODEL, file=AUDIO, response_format="text"
        )
        assert isinstance(text, str) and text
        with pytest.raises(openai.NotFoundError):
            await client.audio.transcriptions.create(model="nope:1b", file=AUDIO)
        with pytest.raises(openai.APIStatusError) as caught:
            await client.audio.transcriptions.create(
                model=MODEL, file=("big.wav", bytes(5000), "audio/wav")
            )
        assert caught.value.status_code == 413
        assert caught.value.body["message"].startswith("request body larger than the limit")
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        form = aiohttp.FormData()
        form.add_field("file", b"RIFF", filename="a.wav", content_type="audio/wav")
        async with http.post(olmd.make_url("/v1/audio/transcriptions"), data=form) as response:
            assert response.status == 400
            assert (await response.json())["error"]["message"] == "model is required"
        async with http.post(
            olmd.make_url("/v1/audio/transcriptions"), json={"model": MODEL}
        ) as response:
            assert response.status == 400
            assert "multipart/form-data" in (await response.json())["error"]["message"]


async def test_head_answers_on_every_get_route(olmd) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    paths = []
    for resource in olmd.app.router.resources():
        info = resource.get_info()
        methods = {route.method for route in resource}
        if "GET" in methods and "path" in info:
            paths.append(info["path"])
    paths.append(f"/v1/models/{MODEL}")
    assert {"/api/version", "/api/tags", "/api/ps", "/v1/models", "/metrics"} <= set(paths)
    async with aiohttp.ClientSession(headers=headers) as http:
        for path in paths:
            get = await http.get(olmd.make_url(path), allow_redirects=False)
            await get.read()
            head = await http.head(olmd.make_url(path), allow_redirects=False)
            assert head.status == get.status, path
            assert await head.read() == b""
            assert head.headers.get("Content-Type") == get.headers.get("Content-Type"), path


async def test_bodies_reach_the_node_byte_for_byte() -> None:
    seen: list[bytes] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response({"model": MODEL, "done": True, "eval_count": 1})

    runner, port = await one_node_app(chat=chat)
    nodes = [{"name": "a", "host": "127.0.0.1", "port": port}]
    data = settings_dict([])
    data["services"]["ollama"]["nodes"] = nodes
    body = (
        b'{"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}],\n'
        b' "think": "high", "truncate": false, "shift": false, "logprobs": true,'
        b' "top_logprobs": 3, "options": {"temperature": 1e-1}, "x-unknown": [1.0, null],'
        b' "stream": false}'
    )
    try:
        async with running_olmd(data) as server, aiohttp.ClientSession() as http:
            _assert_probed(server)
            async with http.post(server.make_url("/api/chat"), data=body) as response:
                assert response.status == 200
    finally:
        await runner.cleanup()
    assert seen == [body]


def _assert_probed(server: Any) -> None:
    fleet = server.app[GATEWAY].fleet
    node = next(iter(fleet))
    assert node.models, "the first probe round ran before the app started"
