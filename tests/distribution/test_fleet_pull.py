"""Fleet-wide /api/pull, /api/delete and /api/copy from the official ollama client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import ollama
import pytest

from daemon.emulator.registry import EmulatedRegistry
from daemon.settings import Settings
from tests.distribution.support import ADMIN, fleet, gateway_settings, listed, olmd, publish
from tests.helpers import free_port


@pytest.fixture
async def registry() -> AsyncIterator[EmulatedRegistry]:
    async with EmulatedRegistry() as reg:
        yield reg


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.distribution.support import TOKEN

    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)


async def test_a_pull_through_olmd_reaches_every_node_through_the_cache(
    tmp_path: Path, registry: EmulatedRegistry
) -> None:
    digests = publish(registry, ["llama3.1:8b"])
    async with fleet(3) as nodes:
        settings = Settings(**gateway_settings(tmp_path, registry, nodes))
        async with olmd(settings) as server:
            url = str(server.make_url("/"))
            async with ollama.AsyncClient(host=url, headers=ADMIN) as client:
                lines = [p async for p in await client.pull("llama3.1:8b", stream=True)]
                assert lines[-1].status == "success"
                # Bytes are summed over the nodes: three nodes, three times the layer.
                layer = max((p for p in lines if p.total), key=lambda p: p.total or 0)
                assert layer.total == 3 * 300_000
            for _, emu in nodes:
                assert await listed(emu) == {"llama3.1:8b": digests["llama3.1:8b"]}
    # One download from the registry for three nodes (plus one byte per blob to find
    # where its redirect leads).
    assert registry.stats.total_bytes == registry.model_bytes("llama3.1:8b") + 3


async def test_without_the_admin_token_a_pull_is_refused_and_nothing_moves(
    tmp_path: Path, registry: EmulatedRegistry
) -> None:
    publish(registry, ["llama3.1:8b"])
    async with fleet(2) as nodes:
        settings = Settings(**gateway_settings(tmp_path, registry, nodes))
        async with olmd(settings) as server:
            url = str(server.make_url("/"))
            wrong = {"Authorization": "Bearer not-the-token"}
            for headers in ({}, wrong):
                async with ollama.AsyncClient(host=url, headers=headers) as client:
                    with pytest.raises(ollama.ResponseError) as refused:
                        await client.pull("llama3.1:8b")
                    assert refused.value.status_code == 403
        for _, emu in nodes:
            assert await listed(emu) == {}
    assert registry.stats.total_bytes == 0


async def test_direct_mode_nodes_pull_themselves_and_x_olmd_nodes_narrows(
    tmp_path: Path, registry: EmulatedRegistry
) -> None:
    digests = publish(registry, ["llama3.1:8b"])
    async with fleet(3) as nodes:
        for _, emu in nodes:
            emu.state.update({"registry": registry.url})
        data = gateway_settings(tmp_path, registry, nodes, mode="direct")
        async with olmd(Settings(**data)) as server:
            headers = {**ADMIN, "X-Olmd-Nodes": "n0,n2"}
            async with ollama.AsyncClient(host=str(server.make_url("/")), headers=headers) as c:
                assert (await c.pull("llama3.1:8b")).status == "success"
        held = [await listed(emu) for _, emu in nodes]
    assert held == [{"llama3.1:8b": digests["llama3.1:8b"]}, {}, held[0]]


async def test_copy_and_delete_go_to_every_node(tmp_path: Path, registry: EmulatedRegistry) -> None:
    publish(registry, ["llama3.1:8b"])
    async with fleet(2) as nodes:
        settings = Settings(**gateway_settings(tmp_path, registry, nodes))
        async with olmd(settings) as server:
            host = str(server.make_url("/"))
            async with ollama.AsyncClient(host=host, headers=ADMIN) as client:
                await client.pull("llama3.1:8b")
                await client.copy("llama3.1:8b", "mine:latest")
                await client.delete("llama3.1:8b")
                with pytest.raises(ollama.ResponseError) as missing:
                    await client.delete("llama3.1:8b")
                assert missing.value.status_code == 404
        for _, emu in nodes:
            assert list(await listed(emu)) == ["mine:latest"]


async def test_a_node_that_cannot_reach_olmd_is_named_with_the_url_it_tried(
    tmp_path: Path, registry: EmulatedRegistry
) -> None:
    publish(registry, ["llama3.1:8b"])
    async with fleet(2) as nodes:
        data = gateway_settings(tmp_path, registry, nodes)
        data["distribution"]["advertise_url"] = "http://127.0.0.1:9"  # nothing listens
        async with olmd(Settings(**data)) as server:
            host = str(server.make_url("/"))
            async with ollama.AsyncClient(host=host, headers=ADMIN) as client:
                with pytest.raises(ollama.ResponseError) as failed:
                    await client.pull("llama3.1:8b")
    message = str(failed.value)
    assert "failed on 2 of 2 nodes" in message
    assert "http://127.0.0.1:9/v2/library/llama3.1/manifests/8b" in message


async def test_a_secret_node_address_stays_out_of_a_fleet_pull_error(
    tmp_path: Path, registry: EmulatedRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = free_port()
    monkeypatch.setenv("OLLAMA_REMOTE_HOST", "127.0.0.1")
    monkeypatch.setenv("OLLAMA_REMOTE_PORT", str(dead))
    data = gateway_settings(tmp_path, registry, [], mode="direct")
    del data["services"]["ollama"]["nodes"]
    async with olmd(Settings(**data)) as server:
        headers = {**ADMIN, "X-Olmd-Nodes": "ollama"}
        async with ollama.AsyncClient(host=str(server.make_url("/")), headers=headers) as c:
            with pytest.raises(ollama.ResponseError) as failed:
                await c.pull("llama3.1:8b")
    message = str(failed.value)
    assert "ollama: cannot reach" in message
    assert "127.0.0.1" not in message
    assert str(dead) not in message
