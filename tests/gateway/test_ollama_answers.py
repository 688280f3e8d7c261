"""Answers as Ollama's, as client libraries see them: a model named in another letter case
reaches the node in the node's own spelling (and hides the model from nobody); an
unknown model in Ollama's own words; ``/api/version`` without a key while keys are
required; no ``Content-Type`` invented; the client's keys never reach a node."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import ollama
import pytest
from aiohttp import web

from daemon.gateway.component import GATEWAY
from tests.gateway.support import MODEL, one_node_app
from tests.helpers import running_olmd, settings_dict

KEY = "answers-key-for-tests"


class Node:
    """A hand-made node listing MODEL that answers /api/chat only for MODEL spelled as it
    lists it (as an Ollama that compares names exactly would), and remembers requests."""

    def __init__(self) -> None:
        self.models: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.deleted = False

    async def chat(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.models.append(body["model"])
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        if self.deleted or body["model"] != MODEL:
            error = f'model "{body["model"]}" not found, try pulling it first'
            return web.json_response({"error": error}, status=404)
        message = {"role": "assistant", "content": "hi"}
        return web.json_response({"model": MODEL, "message": message, "done": True})


def _ollama(server: Any) -> ollama.AsyncClient:
    return ollama.AsyncClient(host=str(server.make_url("/")).rstrip("/"))


async def _olmd_with(node: Node) -> tuple[Any, Any]:
    runner, port = await one_node_app(chat=node.chat)
    data = settings_dict([])
    data["services"]["ollama"]["nodes"] = [{"name": "a", "host": "127.0.0.1", "port": port}]
    return runner, data


async def test_another_letter_case_gets_the_node_spelling_and_hides_nothing() -> None:
    node = Node()
    runner, data = await _olmd_with(node)
    try:
        async with running_olmd(data) as server, _ollama(server) as client:
            shouted = MODEL.upper()
            answer = await client.chat(model=shouted, messages=[{"role": "user", "content": "x"}])
            assert answer.message.content == "hi"
            assert node.models == [MODEL]  # rewritten to the name the node lists
            fleet_node = server.app[GATEWAY].fleet.get("a")
            assert not fleet_node.missing
            assert [m.model for m in (await client.list()).models] == [MODEL]
            # A 404 for the name the node lists is about that model: missing there.
            node.deleted = True
            with pytest.raises(ollama.ResponseError) as caught:
                await client.chat(model=shouted, messages=[{"role": "user", "content": "x"}])
            assert caught.value.status_code == 404
            assert node.models[-1] == MODEL
            assert fleet_node.missing == {MODEL}
    finally:
        await runner.cleanup()


async def test_an_unknown_model_is_answered_in_ollamas_words(three) -> None:
    async with running_olmd(settings_dict(three)) as server, _ollama(server) as client:
        with pytest.raises(ollama.ResponseError) as caught:
            await client.chat(model="nope:1b", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 404
        assert caught.value.error == 'model "nope:1b" not found, try pulling it first'
        with pytest.raises(ollama.ResponseError) as caught:
            await client.generate(model="nope:1b", prompt="x")
        assert caught.value.error == 'model "nope:1b" not found, try pulling it first'


@pytest.mark.parametrize("tenants", [False, True])
async def test_version_answers_without_a_key(three, monkeypatch, tenants) -> None:
    data = settings_dict(three)
    if tenants:
        monkeypatch.setenv("OLMD_API_KEYS", f"team:{KEY}")
        data["tenants"] = [{"name": "team"}]
    else:
        monkeypatch.setenv("OLMD_API_KEYS", KEY)
    async with running_olmd(data) as server, aiohttp.ClientSession() as http:
        url = server.make_url("/api/version")
        async with http.get(url) as response:
            assert response.status == 200
            assert await response.json() == {"version": "0.12.0"}  # no node map
        async with http.head(url) as response:
            assert response.status == 200
        async with http.get(url, headers={"Authorization": "Bearer wrong"}) as response:
            assert await response.json() == {"version": "0.12.0"}
        async with http.get(url, headers={"Authorization": f"Bearer {KEY}"}) as response:
            assert set((await response.json())["nodes"]) == {"a", "b", "c"}
        async with http.get(server.make_url("/api/tags")) as response:
            assert response.status == 401
        async with http.post(server.make_url("/api/version")) as response:
            assert response.status in (401, 405)
        async with _ollama(server) as client:
            with pytest.raises(ollama.ResponseError) as caught:
                await client.list()
            assert caught.value.status_code == 401


async def test_no_content_type_is_invented_and_keys_stay_at_olmd(monkeypatch) -> None:
    monkeypatch.setenv("OLMD_API_KEYS", KEY)
    node = Node()
    runner, data = await _olmd_with(node)
    body = b'{"model": "%s", "messages": [], "stream": false}' % MODEL.encode()
    try:
        async with running_olmd(data) as server, aiohttp.ClientSession() as http:
            url = server.make_url("/api/chat")
            async with http.post(
                url, data=body, headers={"x-api-key": KEY}, skip_auto_headers=["Content-Type"]
            ) as response:
                assert response.status == 200
            async with http.post(
                url,
                data=body,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"},
            ) as response:
                assert response.status == 200
    finally:
        await runner.cleanup()
    without, with_type = node.headers
    assert "content-type" not in without
    assert with_type["content-type"] == "text/plain"
    for seen in node.headers:
        assert "x-api-key" not in seen and "authorization" not in seen
