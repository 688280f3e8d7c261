"""The distributor: the one engine that brings a model into the blob cache.

The sync (gateway mode), fleet-wide ``/api/pull`` and ``olmd models`` all call
:meth:`Distributor.ensure`: fetch the manifest from the registry, download each blob the
cache lacks (once, however many callers want it at the same time), check it, then record
the manifest's bytes. If the registry cannot be reached and the model is cached, the
cached copy is used (an offline fleet). Afterwards the cache is trimmed to its bound,
least recently used blobs that no configured model needs first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from daemon.distribution.cache import BlobCache, CachedModel, ManifestError, blob_digests
from daemon.distribution.client import RegistryClient, RegistryError
from daemon.domain import DEFAULT_HOST, ModelRef
from daemon.logs import get_logger
from daemon.metrics import DistributionMetrics
from daemon.settings import Settings

__all__ = ["Distributor", "EnsureProgress", "cache_from_settings", "cache_status", "mirror_name"]

log = get_logger("olmd.distribution")

EnsureProgress = Callable[[str, int, int], None]
"""(status, completed bytes, total bytes) while a model comes into the cache."""

_GB = 1024**3


def cache_from_settings(settings: Settings) -> BlobCache:
    dist = settings.distribution
    return BlobCache(dist.cache_dir, int(dist.max_cache_gb * _GB))


def mirror_name(settings: Settings, model: str) -> str:
    """The name a node pulls ``model`` by from olmd: ``<advertise host:port>/<ns>/<m>:<t>``."""
    ref = ModelRef.parse(model)
    authority = settings.advertise_url().split("://", 1)[1]
    return f"{authority}/{ref.namespace}/{ref.model}:{ref.tag}"


@dataclass
class _Totals:
    completed: int = 0
    total: int = 0


class Distributor:
    """Brings models into the cache. One per daemon (or per CLI run); shares its
    per-blob locks between every caller, so concurrent callers download a blob once."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        *,
        metrics: DistributionMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache_from_settings(settings)
        self._session = session
        self._metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}
        self.downloading: dict[str, tuple[int, int]] = {}
        """Model → (bytes done, bytes total) of downloads under way, for the status views."""
        self._refresh_size()

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = cache_from_settings(settings)

    def _client(self) -> RegistryClient:
        dist, download = self.settings.distribution, self.settings.services.ollama.download
        return RegistryClient(
            self._session,
            parts=dist.download_parts,
            part_size=dist.part_size_mb * 1024 * 1024,
            stall_timeout=download.stall_timeout,
            max_attempts=download.retry.max_attempts,
            backoff_seconds=download.retry.backoff_seconds,
            connect_timeout=self.settings.services.ollama.health_timeout,
        )

    def registry_base(self, ref: ModelRef) -> str:
        if ref.host == DEFAULT_HOST:
            return self.settings.distribution.registry.rstrip("/")
        return f"https://{ref.host}"

    def cached(self, model: str) -> CachedModel | None:
        return self.cache.model(ModelRef.parse(model))

    async def ensure(self, model: str, progress: EnsureProgress | None = None) -> CachedModel:
        """``model`` in the cache, its manifest as the registry serves it now; raises
        RegistryError naming the URL or the blob digest that failed."""
        ref = ModelRef.parse(model)
        report = progress or (lambda status, done, total: None)
        client = self._client()
        base = self.registry_base(ref)
        report("pulling manifest", 0, 0)
        try:
            raw = await client.manifest(base, ref)
        except RegistryError as exc:
            cached = self.cache.model(ref)
            if cached is None or not exc.retryable:
                raise
            log.warning("distribution.registry_unreachable", model=ref.name, error=str(exc),
                        using="the cached manifest")  # fmt: skip
            return cached
        try:
            blobs = blob_digests(raw)
        except ManifestError as exc:
            raise RegistryError(f"{ref.name}: {manifest_of(base, ref)}: {exc}") from exc
        totals = _Totals(total=sum(size for _, size in blobs))
        self.downloading[ref.name] = (0, totals.total)

        def moved(count: int) -> None:
            totals.completed += count
            self.downloading[ref.name] = (totals.completed, totals.total)
            report(f"pulling {ref.name}", totals.completed, totals.total)

        try:
            for digest, size in blobs:
                await self._blob(client, base, ref, digest, size, moved)
            self.cache.write_manifest(ref, raw)
        finally:
            self.downloading.pop(ref.name, None)
        found = self.cache.model(ref)
        if found is None:  # evicted meanwhile by another caller's trim: very unlikely
            raise RegistryError(f"{ref.name}: the cache lost the model while writing it")
        self.trim()
        return found

    async def _blob(
        self,
        client: RegistryClient,
        base: str,
        ref: ModelRef,
        digest: str,
        size: int,
        moved: Callable[[int], None],
    ) -> None:
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if self.cache.has_blob(digest, size):
                self.cache.touch(digest)
                moved(size)
                if self._metrics is not None:
                    self._metrics.lookups.labels(result="hit").inc()
                return
            if self._metrics is not None:
                self._metrics.lookups.labels(result="miss").inc()

            def counted(count: int) -> None:
                moved(count)
                if self._metrics is not None:
                    self._metrics.registry_bytes.inc(count)

            workdir = self.cache.partial_dir(digest)
            log.info("distribution.blob_download", model=ref.name, digest=digest, size=size)
            verified = await client.blob(base, ref, digest, size, workdir, counted)
            self.cache.commit(digest, verified)
            workdir.rmdir()
            self._refresh_size()

    def trim(self, keep_models: Iterable[str] | None = None) -> None:
        """Evict to the bound; the configured models' blobs go last."""
        names = keep_models if keep_models is not None else self.settings.models()
        keep: set[str] = set()
        for name in names:
            try:
                found = self.cache.model(ModelRef.parse(name))
            except ValueError:
                continue
            if found is not None:
                keep.update(d for d, _ in found.blobs)
        gone = self.cache.evict(keep)
        if gone:
            log.info("distribution.evicted", blobs=len(gone), bytes=sum(s for _, s in gone))
            if self._metrics is not None:
                self._metrics.evicted_bytes.inc(sum(s for _, s in gone))
        self._refresh_size()

    def _refresh_size(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self.cache.size())

    def served(self, count: int) -> None:
        if self._metrics is not None and count:
            self._metrics.served_bytes.inc(count)

    def status(self) -> dict[str, object]:
        """The cache as ``/admin/sync``, ``olmd sync --status`` and ``/ui`` show it."""
        dist = self.settings.distribution
        models = self.cache.models()
        return {
            "mode": dist.mode,
            "registry": dist.registry,
            "advertise_url": self.settings.advertise_url(),
            "cache_dir": str(dist.cache_dir),
            "cache_bytes": self.cache.size(),
            "max_cache_bytes": self.cache.max_bytes,
            "models": [{"name": m.ref.name, "digest": m.digest, "size": m.size} for m in models],
            "downloading": {
                name: {"completed": done, "total": total}
                for name, (done, total) in self.downloading.items()
            },
        }


def cache_status(settings: Settings) -> dict[str, object]:
    """The cache as :meth:`Distributor.status` shows it, without a daemon (the CLI)."""
    cache = cache_from_settings(settings)
    dist = settings.distribution
    return {
        "mode": dist.mode,
        "registry": dist.registry,
        "advertise_url": settings.advertise_url(),
        "cache_dir": str(dist.cache_dir),
        "cache_bytes": cache.size(),
        "max_cache_bytes": cache.max_bytes,
        "models": [
            {"name": m.ref.name, "digest": m.digest, "size": m.size} for m in cache.models()
        ],
        "downloading": {},
    }


def manifest_of(base: str, ref: ModelRef) -> str:
    return f"{base}/v2/{ref.namespace}/{ref.model}/manifests/{ref.tag}"
