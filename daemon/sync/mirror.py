"""The sync's gateway mode: models come into olmd's cache once, and nodes pull from olmd.

:func:`cache_models` is the run's first step in gateway mode: each model some node must
pull is brought into the cache (from the registry, inside the download window; a model
already cached needs no window when ``fanout_outside_window`` is on). A model the cache
cannot get fails on every node that wanted it, naming the URL or the blob digest, and no
node is asked to pull it. :class:`MirroredTransport` then makes each node's pull one from
olmd: ``pull --insecure <advertise host:port>/<ns>/<name>:<tag>``, copy to the short name,
delete the long one (the blobs stay).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from daemon.distribution.client import RegistryError
from daemon.distribution.mirror import Distributor, mirror_name
from daemon.domain import ModelRef
from daemon.ports import ModelTransport, PullError, PullProgress, PullTarget, PullTransport
from daemon.settings import Settings
from daemon.sync.manifest import Manifest, RegistryModel
from daemon.sync.plan import Inventory

__all__ = ["CacheStep", "MirroredTransport", "cache_model", "registry_record", "registry_url"]


def registry_url(settings: Settings, model: str) -> str:
    """The first URL a node fetches when it pulls ``model`` from olmd."""
    ref = ModelRef.parse(model)
    base = settings.advertise_url()
    return f"{base}/v2/{ref.namespace}/{ref.model}/manifests/{ref.tag}"


class MirroredTransport:
    """A node's transport, pulling from olmd's registry endpoint. Satisfies PullTransport."""

    def __init__(self, inner: PullTransport, transport: str, settings: Settings) -> None:
        self._inner = inner
        self._name = transport
        self._settings = settings

    async def pull(self, target: PullTarget, model: str, progress: PullProgress) -> None:
        inner = self._inner
        if not isinstance(inner, ModelTransport):
            raise PullError(
                f"{target.name}: transport {self._name!r} cannot pull from olmd (gateway mode "
                'needs pull_from, copy and delete); use mode = "direct" for this node',
                retryable=False,
            )
        source = mirror_name(self._settings, model)
        try:
            await inner.pull_from(target, source, progress, insecure=True)
        except PullError as exc:
            raise PullError(
                f"{exc} (the node pulls from olmd at {registry_url(self._settings, model)})",
                retryable=exc.retryable,
                node_fatal=exc.node_fatal,
            ) from exc
        await inner.copy(target, source, model)
        await inner.delete(target, source)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class CacheStep:
    """What the cache step found for one model: the cached digest and size, or why not."""

    digest: str | None = None
    size: int = 0
    error: str | None = None
    deferred: bool = False


async def cache_model(distributor: Distributor, model: str, in_window: bool) -> CacheStep:
    """Bring ``model`` into the cache (or find it there, outside the window)."""
    fanout_anytime = distributor.settings.distribution.fanout_outside_window
    if not in_window:
        cached = distributor.cached(model)
        if cached is None or not fanout_anytime:
            return CacheStep(deferred=True)
        return CacheStep(digest=cached.digest, size=cached.size)
    try:
        cached = await distributor.ensure(model)
    except RegistryError as exc:
        return CacheStep(error=str(exc))
    return CacheStep(digest=cached.digest, size=cached.size)


def registry_record(
    distributor: Distributor,
    models: list[str],
    steps: Mapping[str, CacheStep],
    final: Mapping[str, Inventory],
    previous: Manifest | None,
) -> dict[str, RegistryModel]:
    """The manifest's ``registry`` section: each configured model as cached (this run's
    cache step, else the cache as it is, else the previous record), and the nodes that
    hold that very digest."""
    old = (previous.registry or {}) if previous is not None else {}
    out: dict[str, RegistryModel] = {}
    for model in models:
        step = steps.get(model)
        digest, size = (step.digest, step.size) if step is not None else (None, 0)
        if digest is None:
            cached = distributor.cached(model)
            if cached is not None:
                digest, size = cached.digest, cached.size
        if digest is None:
            if model in old:
                out[model] = old[model]
            continue
        holders = [
            name
            for name, inventory in sorted(final.items())
            if (entry := inventory.models.get(model)) is not None and entry.digest == digest
        ]
        out[model] = RegistryModel(digest=digest, size=size, nodes=holders)
    return out
