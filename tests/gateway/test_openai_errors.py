"""Every error under ``/v1`` in OpenAI's shape, read by the real ``openai`` client: what the
guard refuses (401, 403), what aiohttp raises (404, 405, 413), what routing answers (404,
503, 502) and bad bodies (400)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from openai.types import ErrorObject
from yarl import URL

from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL
from tests.helpers import running_olmd, settings_dict

KEY, ADMIN = "client-key-for-tests", "admin-token-for-tests"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def olmd(three, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv("OLMD_API_KEYS", KEY)
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", ADMIN)
    data = settings_dict(three)
    data["server"]["max_body_bytes"] = 4000
    async with running_olmd(data) as server:
        yield server


def _client(server: Any, key: str = KEY) -> openai.AsyncOpenAI:
    base = str(server.make_url("/v1")).rstrip("/")
    return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)


def _parsed(error: openai.APIStatusError, status: int) -> ErrorObject:
    """The error as the openai client reads it: its status, and a body that is OpenAI's
    error object (not a bare string)."""
    assert error.status_code == status
    assert isinstance(error.body, dict), error.body
    parsed = ErrorObject.model_validate(error.body)
    assert parsed.message and parsed.type
    assert error.type == parsed.type
    assert parsed.message in error.message
    return parsed


async def _raises(status: int, call: Any) -> ErrorObject:
    with pytest.raises(openai.APIStatusError) as caught:
        await call
    return _parsed(caught.value, status)


async def test_refusals_and_bad_requests(olmd) -> None:
    async with _client(olmd, key="wrong") as client:
        error = await _raises(401, client.chat.completions.create(model=MODEL, messages=CHAT))
        assert error.message == "missing or invalid API key"
        assert error.type == "invalid_request_error"
        await _raises(401, client.models.list())
    async with _client(olmd) as client:
        assert (await client.chat.completions.create(model=MODEL, messages=CHAT)).choices
        assert await client.models.retrieve(MODEL)
        error = await _raises(404, client.chat.completions.create(model="nope:1b", messages=CHAT))
        # OpenAI's own words and code for a model nobody serves.
        assert error.message.startswith("The model `nope:1b` does not exist")
        assert error.code == "model_not_found"
        await _raises(404, client.models.retrieve("nope:1b"))
        await _raises(400, client.post("/chat/completions", body={}, cast_to=httpx.Response))
        bad = client.post(
            "/chat/completions",
            content=b"{nope",
            options={"headers": {"Content-Type": "application/json"}},
            cast_to=httpx.Response,
        )
        assert "invalid JSON" in (await _raises(400, bad)).message
        big = [{"role": "user", "content": "x" * 5000}]
        error = await _raises(413, client.chat.completions.create(model=MODEL, messages=big))
        assert error.message == "request body larger than the limit of 4000 bytes"
        await _raises(404, client.get("/nothing/here", cast_to=httpx.Response))
        await _raises(404, client.get("", cast_to=httpx.Response))
        error = await _raises(405, client.get("/chat/completions", cast_to=httpx.Response))
        assert error.message == "method GET not allowed on /v1/chat/completions"
        await _raises(405, client.post("/models", cast_to=httpx.Response))


async def test_a_405_names_the_allowed_methods_and_a_path_trick_gets_403(olmd) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(olmd.make_url("/v1/embeddings")) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "POST"
            ErrorObject.model_validate((await response.json())["error"])
        # Read as /api/pull after normalisation: refused like it, in the /v1 route's shape.
        trick = URL(str(olmd.make_url("/"))).join(URL("/v1/%2e%2e/api/pull", encoded=True))
        async with http.post(trick, json={"model": MODEL}) as response:
            assert response.status == 403
            body = await response.json()
            assert ErrorObject.model_validate(body["error"]).message == (
                "this route needs the admin token"
            )


async def test_no_node_for_the_model_is_503_and_an_unreachable_one_502(olmd, three) -> None:
    async with _client(olmd) as client:
        fleet = olmd.app[GATEWAY].fleet
        fleet.set_draining("a", True)
        fleet.set_draining("b", True)
        error = await _raises(503, client.chat.completions.create(model=MODEL, messages=CHAT))
        assert "draining" in error.message
        assert error.type == "server_error"
        fleet.set_draining("a", False)
        fleet.set_draining("b", False)
        for _, _, emu in three:
            await emu.stop()
        error = await _raises(502, client.chat.completions.create(model=MODEL, messages=CHAT))
        assert "unreachable" in error.message
