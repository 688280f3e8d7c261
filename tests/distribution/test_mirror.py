"""The distributor brings a model into the cache once, checked, resumable, bounded."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from daemon.distribution.client import RegistryError
from daemon.distribution.mirror import Distributor
from daemon.domain import ModelRef
from daemon.emulator.registry import EmulatedRegistry
from daemon.metrics import DistributionMetrics, Metrics
from daemon.settings import Settings

SIZES = [400_000, 3_000]


def settings_for(tmp_path: Path, registry: EmulatedRegistry, **dist: object) -> Settings:
    return Settings(
        distribution={
            "mode": "gateway",
            "registry": registry.url,
            "cache_dir": str(tmp_path / "cache"),
            "download_parts": 4,
            "part_size_mb": 1,
            **dist,
        },
        services={
            "ollama": {
                "health_timeout": 2.0,
                "baseline_models": ["llama3.1:8b"],
                "fallback_models": [],
                "download": {"stall_timeout": 2.0, "retry": {"backoff_seconds": 0.01}},
            }
        },
    )


@pytest.fixture
async def registry() -> AsyncIterator[EmulatedRegistry]:
    async with EmulatedRegistry() as reg:
        yield reg


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_model_is_downloaded_once_and_its_manifest_kept_byte_for_byte(
    tmp_path: Path, registry: EmulatedRegistry, session: aiohttp.ClientSession
) -> None:
    digest = registry.add_model("llama3.1:8b", SIZES)
    metrics = Metrics()
    dist = Distributor(
        settings_for(tmp_path, registry), session, metrics=DistributionMetrics(metrics.registry)
    )
    first = await dist.ensure("llama3.1:8b")
    again = await dist.ensure("llama3.1:8b")
    assert first.digest == again.digest == f"sha256:{digest}"
    assert first.raw == registry.manifests[("library", "llama3.1", "8b")]
    # Each blob once, plus the one byte that finds where the registry redirects to.
    blobs = len(registry.blobs)
    assert registry.stats.total_bytes == registry.model_bytes("llama3.1:8b") + blobs
    size = registry.model_bytes("llama3.1:8b")
    assert metric(metrics, "olmd_distribution_registry_bytes_total") == size
    assert metric(metrics, "olmd_distribution_cache_bytes") == size
    assert metric(metrics, "olmd_distribution_cache_lookups_total", result="hit") == blobs


async def test_a_cut_download_resumes_where_it_stopped(
    tmp_path: Path, registry: EmulatedRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_model("llama3.1:8b", SIZES)
    big = next(d for d, data in registry.blobs.items() if len(data) == SIZES[0])
    registry.cut[big] = 50_000  # the first download of it stops after 50 kB
    dist = Distributor(settings_for(tmp_path, registry, download_parts=1), session)
    found = await dist.ensure("llama3.1:8b")
    assert any(d == big for d, _ in found.blobs)
    # Resumed, not started over: the registry sent each byte of the blob once (and the
    # byte of the request that found the redirect's target).
    assert registry.stats.blob_bytes[big] == SIZES[0] + 1
    assert registry.stats.blob_gets[big] == 3
    data = dist.cache.blob_path(big).read_bytes()
    assert "sha256:" + hashlib.sha256(data).hexdigest() == big


async def test_a_corrupt_blob_never_enters_the_cache_and_is_named(
    tmp_path: Path, registry: EmulatedRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_model("llama3.1:8b", SIZES)
    bad = next(d for d, data in registry.blobs.items() if len(data) == SIZES[0])
    registry.corrupt.add(bad)
    dist = Distributor(settings_for(tmp_path, registry), session)
    with pytest.raises(RegistryError, match=f"blob {bad} failed its sha256 check"):
        await dist.ensure("llama3.1:8b")
    assert not dist.cache.has_blob(bad)
    assert dist.cached("llama3.1:8b") is None


async def test_with_the_registry_gone_a_cached_model_is_still_served(
    tmp_path: Path, registry: EmulatedRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_model("llama3.1:8b", SIZES)
    dist = Distributor(settings_for(tmp_path, registry), session)
    first = await dist.ensure("llama3.1:8b")
    await registry.stop()
    assert (await dist.ensure("llama3.1:8b")).digest == first.digest
    with pytest.raises(RegistryError, match=r"cannot fetch http://127\.0\.0\.1"):
        await dist.ensure("qwen3:8b")


async def test_the_cache_stays_under_its_bound_evicting_what_no_model_needs(
    tmp_path: Path, registry: EmulatedRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_model("llama3.1:8b", SIZES)
    registry.add_model("old:1b", SIZES, seed=1)
    bound_gb = (registry.model_bytes("llama3.1:8b") + 10_000) / 1024**3
    dist = Distributor(settings_for(tmp_path, registry, max_cache_gb=bound_gb), session)
    await dist.ensure("old:1b")
    await dist.ensure("llama3.1:8b")  # configured: old:1b makes room for it
    assert dist.cached("llama3.1:8b") is not None
    assert dist.cached("old:1b") is None
    assert dist.cache.size() <= dist.cache.max_bytes
    assert [m.ref for m in dist.cache.models()] == [ModelRef.parse("llama3.1:8b")]


async def test_a_stalled_download_is_abandoned_and_resumed(
    tmp_path: Path, registry: EmulatedRegistry, session: aiohttp.ClientSession
) -> None:
    registry.add_model("llama3.1:8b", SIZES)
    big = next(d for d, data in registry.blobs.items() if len(data) == SIZES[0])
    registry.stall[big] = 60_000  # then nothing, for an hour
    settings = settings_for(tmp_path, registry, download_parts=1)
    download = settings.services.ollama.download.model_copy(update={"stall_timeout": 0.3})
    ollama_ = settings.services.ollama.model_copy(update={"download": download})
    settings = settings.model_copy(
        update={"services": settings.services.model_copy(update={"ollama": ollama_})}
    )
    found = await Distributor(settings, session).ensure("llama3.1:8b")
    assert any(d == big for d, _ in found.blobs)
    assert registry.stats.blob_bytes[big] == SIZES[0] + 1  # resumed after the stall
