"""`olmd sync` in gateway mode: one download per model for the whole fleet."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from daemon.distribution.component import DISTRIBUTION
from daemon.emulator.registry import EmulatedRegistry
from daemon.settings import load_settings
from daemon.sync.service import SyncOptions, run_sync
from tests.distribution.support import (
    ADMIN,
    MODELS,
    TOKEN,
    fleet,
    gateway_settings,
    listed,
    olmd,
    publish,
)
from tests.helpers import run_cli, write_settings
from tests.sync.support import UTC8


@pytest.fixture
async def registry() -> AsyncIterator[EmulatedRegistry]:
    async with EmulatedRegistry() as reg:
        yield reg


def settings_file(tmp_path: Path, data: dict[str, Any]) -> Path:
    return write_settings(tmp_path / "settings.toml", data)


async def test_three_nodes_two_models_one_download_each(
    tmp_path: Path,
    registry: EmulatedRegistry,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLMD_ADMIN_TOKEN", TOKEN)
    digests = publish(registry)
    big = json.loads(registry.manifests[("library", "llama3.1", "8b")])["layers"][0]["digest"]
    registry.cut[big] = 100_000  # its first download breaks off after 100 kB
    async with fleet(3) as nodes:
        path = settings_file(tmp_path, gateway_settings(tmp_path, registry, nodes))
        async with olmd(load_settings(path)) as server:
            code, out, err = await run_cli(capsys, "sync", "--config", str(path))
            assert code == 0, out + err
            for _, emu in nodes:
                # Short names only, with the registry's digests: no prefixed name left.
                assert await listed(emu) == {m: digests[m] for m in MODELS}
            async with aiohttp.ClientSession(headers=ADMIN) as http:
                async with http.get(str(server.make_url("/admin/sync"))) as r:
                    cache = (await r.json())["cache"]
                async with http.get(str(server.make_url("/metrics"))) as r:
                    metrics = await r.text()
        code, out, _ = await run_cli(capsys, "sync", "--config", str(path), "--status")
        assert code == 0
        assert json.loads(out)["cache"]["models"] == cache["models"]
    # The registry served each blob once (and one byte per blob that found its CDN URL):
    # the cut download resumed where it stopped.
    assert big not in registry.cut
    served = registry.stats.blob_bytes
    assert served == {digest: len(data) + 1 for digest, data in registry.blobs.items()}
    assert registry.stats.total_bytes == sum(registry.model_bytes(m) + 3 for m in MODELS)
    assert {m["name"]: m["digest"][7:] for m in cache["models"]} == digests
    # Every node's pull came from olmd: at least three times each model's bytes served
    # (Ollama's first GET of a blob, which only reads where the blob is, takes some more).
    served = sum(3 * registry.model_bytes(m) for m in MODELS)
    line = next(x for x in metrics.splitlines() if x.startswith("olmd_distribution_served"))
    assert served <= float(line.split()[-1]) <= 2 * served
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for model in MODELS:
        record = manifest["registry"][model]
        assert record["digest"] == f"sha256:{digests[model]}"
        assert record["nodes"] == ["n0", "n1", "n2"]
    assert manifest["drift"] == []


async def test_a_corrupt_blob_fails_the_model_on_every_node_and_keeps_the_manifest(
    tmp_path: Path, registry: EmulatedRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    digests = publish(registry)
    async with fleet(2) as nodes:
        path = settings_file(tmp_path, gateway_settings(tmp_path, registry, nodes))
        async with olmd(load_settings(path)):
            code, out, err = await run_cli(capsys, "sync", "--config", str(path), "--models",
                                           "llama3.1:8b")  # fmt: skip
            assert code == 0, out + err
            good = (tmp_path / "manifest.json").read_bytes()
            # The registry now serves a new qwen3 whose big layer arrives corrupt.
            registry.add_model("qwen3:8b", [300_000, 2_000], seed=7)
            bad = json.loads(registry.manifests[("library", "qwen3", "8b")])["layers"][0]["digest"]
            registry.corrupt.add(bad)
            code, out, err = await run_cli(capsys, "sync", "--config", str(path), "--models",
                                           "qwen3:8b")  # fmt: skip
            assert code != 0
            assert bad in out + err  # the failure names the digest
            for _, emu in nodes:
                assert await listed(emu) == {"llama3.1:8b": digests["llama3.1:8b"]}
    assert (tmp_path / "manifest.json").read_bytes() == good
    assert not (tmp_path / "cache" / "blobs" / bad.replace(":", "-")).exists()


async def test_a_node_that_cannot_reach_olmd_fails_naming_the_url(
    tmp_path: Path, registry: EmulatedRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(registry)
    async with fleet(1) as nodes:
        data = gateway_settings(tmp_path, registry, nodes, models=["llama3.1:8b"])
        # No olmd daemon answers on the advertised address.
        path = settings_file(tmp_path, data)
        code, out, err = await run_cli(capsys, "sync", "--config", str(path))
    assert code != 0
    advertised = data["distribution"]["advertise_url"]
    assert f"{advertised}/v2/library/llama3.1/manifests/8b" in out + err


async def test_skip_existing_and_dry_run_behave_as_in_direct_mode(
    tmp_path: Path, registry: EmulatedRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    publish(registry)
    async with fleet(2) as nodes:
        path = settings_file(tmp_path, gateway_settings(tmp_path, registry, nodes))
        async with olmd(load_settings(path)):
            code, _, _ = await run_cli(capsys, "sync", "--config", str(path), "--dry-run")
            assert code == 0
            assert registry.stats.total_bytes == 0  # a dry run downloads nothing
            code, _, _ = await run_cli(capsys, "sync", "--config", str(path), "--host", "n0")
            assert code == 0
            assert list(await listed(nodes[1][1])) == []
            before = registry.stats.total_bytes
            code, _, _ = await run_cli(capsys, "sync", "--config", str(path), "--skip-existing")
            assert code == 0
            assert registry.stats.total_bytes == before  # n1 pulled from olmd's cache
            assert sorted(await listed(nodes[1][1])) == sorted(MODELS)


async def test_outside_the_window_only_cached_models_reach_the_nodes(
    tmp_path: Path, registry: EmulatedRegistry
) -> None:
    digests = publish(registry)
    async with fleet(2) as nodes:
        data = gateway_settings(tmp_path, registry, nodes)
        data["services"]["ollama"]["download"]["allowed_window"] = "02:00-06:00 UTC+8"
        settings = load_settings(settings_file(tmp_path, data))
        async with olmd(settings) as server:
            await server.app[DISTRIBUTION].ensure("llama3.1:8b")  # cached earlier
            before = registry.stats.total_bytes
            noon = datetime(2024, 3, 10, 12, 0, tzinfo=UTC8)  # outside the window
            result = await run_sync(settings, SyncOptions(), now=lambda: noon)
            outcomes = {(o.node, o.model): o for o in result.outcomes}
            for name, emu in nodes:
                # The cached model went out over the LAN; the other waits for the window.
                assert await listed(emu) == {"llama3.1:8b": digests["llama3.1:8b"]}
                assert outcomes[(name, "qwen3:8b")].status == "deferred"
                assert "not in olmd's cache yet" in (outcomes[(name, "qwen3:8b")].error or "")
    assert registry.stats.total_bytes == before  # nothing came from the registry
