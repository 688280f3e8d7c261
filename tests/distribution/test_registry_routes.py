"""olmd's registry routes: what Ollama needs, to the nodes only, from the cache only."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from daemon.distribution.component import DISTRIBUTION
from daemon.emulator.registry import EmulatedRegistry
from daemon.settings import Settings
from tests.distribution.support import fleet, gateway_settings, olmd, publish


@pytest.fixture
async def registry() -> AsyncIterator[EmulatedRegistry]:
    async with EmulatedRegistry() as reg:
        yield reg


def own_address() -> str | None:
    """This machine's address on its network (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # no packet is sent
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


async def test_a_cached_model_is_served_as_ollama_needs_it(
    tmp_path: Path, registry: EmulatedRegistry
) -> None:
    publish(registry, ["llama3.1:8b"])
    async with fleet(1) as nodes:
        settings = Settings(**gateway_settings(tmp_path, registry, nodes))
        async with olmd(settings) as server, aiohttp.ClientSession() as http:
            cached = await server.app[DISTRIBUTION].ensure("llama3.1:8b")
            base = str(server.make_url("/v2/library/llama3.1"))
            async with http.get(f"{base}/manifests/8b") as r:
                assert r.status == 200
                assert await r.read() == cached.raw  # byte for byte
            digest, size = cached.blobs[0]
            async with http.head(f"{base}/blobs/{digest}") as r:
                assert (r.status, r.content_length) == (200, size)
            async with http.get(f"{base}/blobs/{digest}", allow_redirects=False) as r:
                assert r.status == 200
                assert r.headers["Location"] == f"/v2/library/llama3.1/blobs/{digest}"
                whole = await r.read()
            assert "sha256:" + hashlib.sha256(whole).hexdigest() == digest
            async with http.get(f"{base}/blobs/{digest}", headers={"Range": "bytes=10-19"}) as r:
                assert r.status == 206
                assert r.headers["Content-Range"] == f"bytes 10-19/{size}"
                assert await r.read() == whole[10:20]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/library/qwen3/manifests/8b",  # not cached
        "/v2/library/llama3.1/blobs/sha256:" + "0" * 64,  # not cached
        "/v2/library/llama3.1/blobs/sha256-" + "0" * 64,  # not a digest
        "/v2/library/llama3.1/blobs/..%2F..%2Fmanifests",
        "/v2/..%2F..%2F..%2Fetc/passwd/manifests/x",
        "/v2/library/llama3.1/manifests/..%2F..%2F..%2Fblobs",
        "/v2/library/llama3.1/blobs/%2E%2E",
    ],
)
async def test_only_cached_digests_and_manifests_are_served(
    tmp_path: Path, registry: EmulatedRegistry, path: str
) -> None:
    publish(registry, ["llama3.1:8b"])
    async with fleet(1) as nodes:
        settings = Settings(**gateway_settings(tmp_path, registry, nodes))
        (tmp_path / "cache").mkdir()
        (tmp_path / "secret").write_text("not for nodes")
        async with olmd(settings) as server, aiohttp.ClientSession() as http:
            await server.app[DISTRIBUTION].ensure("llama3.1:8b")
            url = str(server.make_url("/")).rstrip("/") + path
            async with http.get(aiohttp.client.URL(url, encoded=True)) as r:
                body = await r.read()
    assert r.status in (400, 404)
    assert b"not for nodes" not in body


async def test_an_address_that_is_not_a_node_is_refused(
    tmp_path: Path, registry: EmulatedRegistry
) -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    publish(registry, ["llama3.1:8b"])
    async with fleet(1) as nodes:
        data = gateway_settings(tmp_path, registry, nodes)
        data["server"]["host"] = address
        settings = Settings(**data)
        from aiohttp.test_utils import TestServer

        from daemon.runtime import RUNTIME, Phase
        from daemon.service import build_app

        server = TestServer(build_app(settings), host=address, port=settings.server.port)
        await server.start_server()
        server.app[RUNTIME].set_phase(Phase.READY)
        try:
            await server.app[DISTRIBUTION].ensure("llama3.1:8b")
            path = f"http://{address}:{settings.server.port}/v2/library/llama3.1/manifests/8b"
            async with aiohttp.ClientSession() as http, http.get(path) as r:
                assert r.status == 403  # from this machine's LAN address: not a node's
            # Once that address is a node's, it is served.
            nodes_now = [*data["services"]["ollama"]["nodes"], {"name": "lan", "host": address}]
            data["services"]["ollama"]["nodes"] = nodes_now
            await server.app[RUNTIME].apply(Settings(**data))
            async with aiohttp.ClientSession() as http, http.get(path) as r:
                assert r.status == 200
        finally:
            await server.close()
