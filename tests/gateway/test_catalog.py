"""The merged catalogs (``/api/tags``, ``/api/ps``, ``/v1/models``, ``/api/version``) list
what the nodes that answer serve, through an outage and panic routing."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from daemon.gateway.component import GATEWAY
from tests.gateway.support import GENERATE, MODEL, post, url
from tests.helpers import running_olmd, settings_dict


async def _get(http: aiohttp.ClientSession, server, path: str) -> tuple[int, dict]:
    async with http.get(url(server, path)) as response:
        return response.status, await response.json()


def _names(listing: dict) -> set[str]:
    return {m["name"] for m in listing["models"]}


async def test_a_node_that_stops_answering_leaves_the_catalogs(three) -> None:
    c = three[2][2]
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        _, tags = await _get(http, server, "/api/tags")
        assert "qwen3-coder:30b" in _names(tags)
        await c.stop()
        await server.app[GATEWAY].prober.probe_all()  # one failed probe: not answering

        _, tags = await _get(http, server, "/api/tags")
        assert _names(tags) == {MODEL, "nomic-embed-text:latest"}
        assert {n for m in tags["models"] for n in m["nodes"]} == {"a", "b"}
        _, models = await _get(http, server, "/v1/models")
        assert {m["id"] for m in models["data"]} == {MODEL, "nomic-embed-text:latest"}
        status, version = await _get(http, server, "/api/version")
        assert status == 200 and set(version["nodes"]) == {"a", "b"}


async def test_with_every_node_down_the_lists_are_empty_and_version_is_503(three) -> None:
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        await post(http, server, "/api/generate", GENERATE)
        await server.app[GATEWAY].prober.probe_all()
        _, ps = await _get(http, server, "/api/ps")
        assert MODEL in _names(ps)
        for _, _, emu in three:
            await emu.stop()
        await server.app[GATEWAY].prober.probe_all()

        for path in ("/api/tags", "/api/ps"):
            status, listing = await _get(http, server, path)
            assert (status, listing) == (200, {"models": []}), path
        status, models = await _get(http, server, "/v1/models")
        assert (status, models) == (200, {"object": "list", "data": []})
        async with http.get(url(server, "/api/version")) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "5"
            assert (await response.json())["error"] == "no Ollama node answers"
        # Routing still tries them (panic routing), and says what went wrong.
        status, _, body = await post(http, server, "/api/generate", GENERATE)
        assert status >= 500 and body["error"]


async def test_a_draining_node_lists_nothing(three) -> None:
    async with running_olmd(settings_dict(three)) as server, aiohttp.ClientSession() as http:
        server.app[GATEWAY].fleet.set_draining("c", True)
        _, tags = await _get(http, server, "/api/tags")
        assert "qwen3-coder:30b" not in _names(tags)
        _, version = await _get(http, server, "/api/version")
        assert set(version["nodes"]) == {"a", "b"}


@pytest.mark.parametrize("name", [MODEL, "llama3.1:8b", "library/llama3.1:8b"])
async def test_models_retrieve_finds_a_listed_model(three, name: str) -> None:
    async with running_olmd(settings_dict(three)) as server:
        base = str(server.make_url("/v1")).rstrip("/")
        async with openai.AsyncOpenAI(base_url=base, api_key="unused") as client:
            model = await client.models.retrieve(name)
            assert (model.id, model.object, model.owned_by) == (name, "model", "library")
            assert model.created > 0
            with pytest.raises(openai.NotFoundError) as caught:
                await client.models.retrieve("nope:1b")
            assert caught.value.status_code == 404
            assert "nope:1b" in caught.value.message
