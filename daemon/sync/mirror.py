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

import asyncio
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from daemon.distribution.client import RegistryError
from daemon.distribution.mirror import Distributor, mirror_name
from daemon.domain import ModelRef
from daemon.ports import ModelTransport, PullError, PullProgress, PullTarget, PullTransport
from daemon.settings import Settings
from daemon.sync.manifest import Manifest, RegistryModel
from daemon.sync.plan import Inventory
from daemon.window import AllowedWindow

__all__ = [
    "CacheRun",
    "CacheStep",
    "MirroredTransport",
    "cache_model",
    "cache_models",
    "registry_record",
    "registry_url",
]


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
    """What the cache step found for one model: the cached digest and size, or why not
    (``error``: the registry failed it; ``deferred``: it must wait for the window)."""

    digest: str | None = None
    size: int = 0
    error: str | None = None
    deferred: str | None = None


@dataclass
class CacheRun:
    """The cache step of a run: a step per model handled, and why it was cut, if it was
    (the models without a step were not handled)."""

    steps: dict[str, CacheStep] = field(default_factory=dict)
    cut: str | None = None


async def cache_model(distributor: Distributor, model: str, waiting: str | None) -> CacheStep:
    """Bring ``model`` into the cache; outside the window (``waiting`` says why it must
    wait) only find it there."""
    if waiting is not None:
        cached = distributor.cached(model)
        if cached is None or not distributor.settings.distribution.fanout_outside_window:
            return CacheStep(deferred=waiting)
        return CacheStep(digest=cached.digest, size=cached.size)
    try:
        cached = await distributor.ensure(model)
    except RegistryError as exc:
        return CacheStep(error=str(exc))
    return CacheStep(digest=cached.digest, size=cached.size)


async def cache_models(
    distributor: Distributor,
    models: list[str],
    window: AllowedWindow,
    at: datetime,
    *,
    ignore_window: bool,
    stop: asyncio.Event,
) -> CacheRun:
    """Each model into the cache in turn, registry downloads only inside ``window``
    (unless ``ignore_window``); cut when ``stop`` is set or the window closes."""
    close = None if ignore_window else window.current_close(at)
    waiting = None
    if not ignore_window and close is None:
        opens = window.next_open(at).astimezone(window.tz)
        waiting = (
            f"outside the allowed download window {window} (next opens "
            f"{opens:%Y-%m-%d %H:%M}) and not in olmd's cache yet; --ignore-window "
            "downloads now"
        )
    loop = asyncio.get_running_loop()
    deadline = None if close is None else loop.time() + (close - at).total_seconds()
    run = CacheRun()
    for model in models:
        left = None if deadline is None else deadline - loop.time()
        step = await _until(cache_model(distributor, model, waiting), stop, left)
        if step is None:
            if stop.is_set() or close is None:
                run.cut = "olmd's cache step was stopped"
            else:
                run.cut = f"the window closed at {close.astimezone(window.tz):%H:%M} {window.zone}"
            return run
        run.steps[model] = step
    return run


async def _until(
    work: Coroutine[Any, Any, CacheStep], stop: asyncio.Event, seconds: float | None
) -> CacheStep | None:
    """``work``'s result, or None if ``stop`` or ``seconds`` came first (it is cancelled)."""
    task = asyncio.create_task(work, name="olmd-sync cache")
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
        await asyncio.wait({task, stopped})
    return None if task.cancelled() else task.result()


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
