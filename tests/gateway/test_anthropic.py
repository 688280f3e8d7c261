"""Anthropic's Messages API through olmd, read by the real ``anthropic`` client against the
emulator: whole and streamed answers, and every error olmd answers itself on
``/v1/messages`` in Anthropic's shape (400, 401, 404, 405, 413, 429, 502, 503), down to
the ``event: error`` that ends a stream a node cut."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import httpx
import pytest

from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL
from tests.helpers import running_olmd, settings_dict

KEY = "anthropic-key-for-tests"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def olmd(three, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("OLMD_API_KEYS", KEY)
    data = settings_dict(three)
    data["server"]["max_body_bytes"] = 4000
    async with running_olmd(data) as server:
        yield server


def _client(server: Any, **auth: str) -> anthropic.AsyncAnthropic:
    base = str(server.make_url("/")).rstrip("/")
    return anthropic.AsyncAnthropic(base_url=base, max_retries=0, **(auth or {"api_key": KEY}))


def _anthropic_body(error: anthropic.APIStatusError, status: int) -> dict[str, Any]:
    """The error as Anthropic answers one: its status, ``{"type": "error", "error":
    {"type", "message"}}``, the message the client shows."""
    assert error.status_code == status
    body = error.body
    assert isinstance(body, dict) and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["message"] in str(error)
    return dict(body["error"])


async def _raises(status: int, call: Any) -> dict[str, Any]:
    with pytest.raises(anthropic.APIStatusError) as caught:
        await call
    return _anthropic_body(caught.value, status)


async def test_messages_whole_and_streamed(olmd) -> None:
    async with _client(olmd) as client:
        message = await client.messages.create(model=MODEL, max_tokens=64, messages=HI)
        assert message.type == "message" and message.role == "assistant"
        assert message.content[0].type == "text" and message.content[0].text
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens > 0
        async with client.messages.stream(
            model=MODEL, max_tokens=3, system="be brief", messages=HI
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert text and final.content[0].text == text
        assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3
        # The bearer form (ANTHROPIC_AUTH_TOKEN) is a key too.
    async with _client(olmd, auth_token=KEY) as client:
        assert (await client.messages.create(model=MODEL, max_tokens=8, messages=HI)).content
    metrics = olmd.app[GATEWAY].proxy.metrics.exposition().decode()
    assert 'olmd_tokens_total{direction="out",model="llama3.1:8b"' in metrics


async def test_errors_olmd_answers_are_anthropics(olmd, three) -> None:
    async with _client(olmd, api_key="wrong") as client:
        error = await _raises(401, client.messages.create(model=MODEL, max_tokens=8, messages=HI))
        assert error == {"type": "authentication_error", "message": "missing or invalid API key"}
    async with _client(olmd) as client:
        error = await _raises(
            404, client.messages.create(model="nope:1b", max_tokens=8, messages=HI)
        )
        assert error == {"type": "not_found_error", "message": "model: nope:1b"}
        error = await _raises(400, client.post("/v1/messages", body={}, cast_to=httpx.Response))
        assert error == {"type": "invalid_request_error", "message": "model is required"}
        bad = client.post(
            "/v1/messages",
            content=b"{nope",
            options={"headers": {"Content-Type": "application/json"}},
            cast_to=httpx.Response,
        )
        assert (await _raises(400, bad))["message"] == "invalid JSON in the request body"
        big = [{"role": "user", "content": "x" * 5000}]
        error = await _raises(413, client.messages.create(model=MODEL, max_tokens=8, messages=big))
        assert error["type"] == "request_too_large"
        error = await _raises(405, client.get("/v1/messages", cast_to=httpx.Response))
        assert error["type"] == "invalid_request_error"
        fleet = olmd.app[GATEWAY].fleet
        for name in ("a", "b"):
            fleet.set_draining(name, True)
        error = await _raises(503, client.messages.create(model=MODEL, max_tokens=8, messages=HI))
        assert error["type"] == "overloaded_error"
        for name in ("a", "b"):
            fleet.set_draining(name, False)
        for _, _, emu in three:
            await emu.stop()
        error = await _raises(502, client.messages.create(model=MODEL, max_tokens=8, messages=HI))
        assert error["type"] == "api_error" and "unreachable" in error["message"]


async def test_a_tenant_over_its_limit_gets_anthropics_429(three, monkeypatch) -> None:
    monkeypatch.setenv("OLMD_API_KEYS", f"capped:{KEY}")
    data = settings_dict(three)
    data["tenants"] = [{"name": "capped", "requests_per_minute": 1}]
    async with running_olmd(data) as server, _client(server) as client:

        async def until_refused() -> None:
            for _ in range(5):  # the bucket holds one request a minute; bounded
                await client.messages.create(model=MODEL, max_tokens=4, messages=HI)

        with pytest.raises(anthropic.RateLimitError) as caught:
            await until_refused()
        error = _anthropic_body(caught.value, 429)
        assert error["type"] == "rate_limit_error"
        assert int(caught.value.response.headers["Retry-After"]) >= 1


async def test_a_stream_the_node_cuts_ends_with_an_anthropic_error_event(olmd, three) -> None:
    for _, _, emu in three:
        emu.state.update({"fault": "cut", "fault_after": 3, "tokens": 8})
    async with _client(olmd) as client:

        async def read_all() -> None:
            async with client.messages.stream(model=MODEL, max_tokens=64, messages=HI) as stream:
                async for _ in stream.text_stream:
                    pass

        with pytest.raises(anthropic.APIStatusError) as caught:
            await read_all()
        assert caught.value.body["error"]["type"] == "api_error"
        assert "stream cut" in caught.value.body["error"]["message"]
    # On the wire: the events the node sent, then exactly one error event.
    headers = {"x-api-key": KEY}
    body = {"model": MODEL, "max_tokens": 64, "messages": HI, "stream": True}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(olmd.make_url("/v1/messages"), json=body) as response:
            assert response.status == 200
            text = (await response.read()).decode()
    events = [line for line in text.split("\n") if line.startswith("event: ")]
    assert events[0] == "event: message_start" and events[-1] == "event: error"
    assert events.count("event: error") == 1
