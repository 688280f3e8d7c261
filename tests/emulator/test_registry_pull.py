"""The emulator pulls from a registry as Ollama does, and answers /api/copy."""

from __future__ import annotations

from collections.abc import AsyncIterator

import ollama
import pytest

from daemon.emulator.registry import EmulatedRegistry
from daemon.emulator.server import Emulator, EmulatorConfig

SIZES = [300_000, 2_000]


@pytest.fixture
async def registry() -> AsyncIterator[EmulatedRegistry]:
    async with EmulatedRegistry() as reg:
        yield reg


@pytest.fixture
async def node() -> AsyncIterator[Emulator]:
    async with Emulator(EmulatorConfig(models=[])) as emu:
        yield emu


async def tags(emu: Emulator) -> dict[str, str]:
    async with ollama.AsyncClient(host=emu.url) as client:
        listed = await client.list()
    return {m.model or "": m.digest or "" for m in listed.models}


async def test_an_insecure_pull_follows_the_redirect_to_another_host_and_checks_digests(
    registry: EmulatedRegistry, node: Emulator
) -> None:
    digest = registry.add_model("llama3.1:8b", SIZES)
    name = f"127.0.0.1:{registry.port}/library/llama3.1:8b"
    async with ollama.AsyncClient(host=node.url) as client:
        statuses = [p.status async for p in await client.pull(name, insecure=True, stream=True)]
        assert statuses[-1] == "success"
        await client.copy(name, "llama3.1:8b")
        await client.delete(name)
    assert await tags(node) == {"llama3.1:8b": digest}
    # Each blob came once, from the CDN host the registry sent the node to.
    assert registry.stats.total_bytes == registry.model_bytes("llama3.1:8b")
    assert set(registry.stats.blob_gets.values()) >= {1}


async def test_a_pull_of_a_short_name_uses_the_configured_registry(
    registry: EmulatedRegistry,
) -> None:
    digest = registry.add_model("qwen3:8b", SIZES)
    config = EmulatorConfig(models=[], registry=registry.url)
    async with Emulator(config) as emu, ollama.AsyncClient(host=emu.url) as client:
        await client.pull("qwen3:8b")
        assert await tags(emu) == {"qwen3:8b": digest}


@pytest.mark.parametrize(
    ("answer", "error"),
    [("plain", "no Location header in response"), ("location", None)],
)
async def test_a_blob_get_must_redirect_or_carry_a_location(
    registry: EmulatedRegistry, node: Emulator, answer: str, error: str | None
) -> None:
    registry.add_model("llama3.1:8b", SIZES)
    registry.blob_answer = answer  # type: ignore[assignment]
    name = f"127.0.0.1:{registry.port}/library/llama3.1:8b"
    async with ollama.AsyncClient(host=node.url) as client:
        if error is None:
            await client.pull(name, insecure=True)
            assert name in await tags(node)
        else:
            with pytest.raises(ollama.ResponseError, match=error):
                await client.pull(name, insecure=True)
            assert await tags(node) == {}


async def test_a_corrupt_blob_fails_the_pull_naming_the_digest(
    registry: EmulatedRegistry, node: Emulator
) -> None:
    registry.add_model("llama3.1:8b", SIZES)
    bad = next(d for d, data in registry.blobs.items() if len(data) == SIZES[0])
    registry.corrupt.add(bad)
    name = f"127.0.0.1:{registry.port}/library/llama3.1:8b"
    async with ollama.AsyncClient(host=node.url) as client:
        with pytest.raises(ollama.ResponseError, match=f"digest mismatch.*want {bad}"):
            await client.pull(name, insecure=True)
    assert await tags(node) == {}


async def test_a_registry_without_the_model_is_ollamas_not_found(
    registry: EmulatedRegistry, node: Emulator
) -> None:
    name = f"127.0.0.1:{registry.port}/library/nope:1b"
    async with ollama.AsyncClient(host=node.url) as client:
        with pytest.raises(ollama.ResponseError, match="file does not exist"):
            await client.pull(name, insecure=True)
