"""The fleet's sync as every gateway sees it: the shared run record in Redis, read on a timer.

With the cluster on, the gateway holding the sync lease writes the run record
(:mod:`daemon.sync.claim`, under its fencing number); every gateway reads it here every
second, so ``GET /admin/sync``, the sync gauges of ``/metrics`` and ``olmd sync --status``
tell the same story wherever they are asked. The record's fields (one Redis hash, see
:mod:`daemon.cluster.record`):

* ``gateway``, ``running`` ("1"/"0"), ``trigger``, ``options`` (JSON), ``started``: the run;
* ``progress``: the run's progress (JSON, as ``SyncProgress.snapshot()``), kept after it;
* ``state``: the last run's state (JSON, a :class:`~daemon.sync.state.SyncState`);
* ``result``: the last run's result (JSON, ``SyncResult.to_dict()`` plus ``seconds`` and
  ``models_present``), ``last_error``: why the last run broke ("" if it did not);
* ``manifest`` (the whole manifest, JSON) and ``manifest_summary`` (what /admin/sync shows).

Redis unreachable: the last view read stays, and ``cluster.connected`` says it is old.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from daemon.cluster.client import Cluster, ClusterDown
from daemon.cluster.lease import LeaseHolder, read_holder
from daemon.cluster.record import SharedRecord
from daemon.logs import get_logger
from daemon.metrics import SyncMetrics
from daemon.sync.manifest import Manifest
from daemon.sync.state import SyncState

__all__ = ["LEASE", "RunView", "SharedSync", "read_manifest_copy", "read_view", "record_of"]

log = get_logger("olmd.sync")

LEASE = "sync"  # the name of the lease, and of the record it guards
_REFRESH_SECONDS = 1.0
_FIELDS = (
    "fence", "gateway", "running", "trigger", "options", "progress", "state", "result",
    "manifest_summary", "last_error",
)  # fmt: skip


def record_of(cluster: Cluster) -> SharedRecord:
    return SharedRecord(cluster, LEASE)


def _json(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


@dataclass(frozen=True)
class RunView:
    """The shared run record as read once, and who holds the lease at that moment."""

    fence: int = 0
    gateway: str | None = None
    running: bool = False
    """The record says a run is going (its holder may have died: see :attr:`live`)."""
    trigger: str | None = None
    options: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None
    state: SyncState | None = None
    result: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    last_error: str | None = None
    holder: LeaseHolder | None = None

    @property
    def live(self) -> bool:
        """A run is going and its holder still holds the lease."""
        return self.running and self.holder is not None

    @classmethod
    def parse(cls, fields: dict[str, str], holder: LeaseHolder | None) -> RunView:
        state = None
        if fields.get("state"):
            try:
                state = SyncState.model_validate_json(fields["state"])
            except ValidationError as exc:
                log.warning("sync.shared_state_unreadable", error=str(exc).splitlines()[0])
        return cls(
            fence=int(fields.get("fence") or 0),
            gateway=fields.get("gateway") or None,
            running=fields.get("running") == "1",
            trigger=fields.get("trigger") or None,
            options=_json(fields.get("options")),
            progress=_json(fields.get("progress")),
            state=state,
            result=_json(fields.get("result")),
            manifest=_json(fields.get("manifest_summary")),
            last_error=fields.get("last_error") or None,
            holder=holder,
        )


async def read_view(cluster: Cluster) -> RunView:
    """The record and the lease's holder now. Raises ClusterDown."""
    fields = await record_of(cluster).read(_FIELDS)
    return RunView.parse(fields, await read_holder(cluster, LEASE))


async def read_manifest_copy(cluster: Cluster) -> Manifest | None:
    """The manifest the last run stored in Redis; None if there is none (or it is not a
    manifest: logged). Raises ClusterDown."""
    raw = (await record_of(cluster).read(["manifest"])).get("manifest")
    if not raw:
        return None
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        log.warning("sync.shared_manifest_unreadable", error=str(exc).splitlines()[0])
        return None


class SharedSync:
    """This gateway's copy of the shared record, read every second while the daemon runs.

    ``running_here`` says whether this gateway runs a sync right now (for the gauge).
    The refresh task belongs to this object: :meth:`start` it, :meth:`close` ends it.
    """

    def __init__(
        self,
        cluster: Cluster,
        metrics: SyncMetrics | None = None,
        *,
        running_here: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cluster = cluster
        self.view: RunView | None = None
        self._metrics = metrics
        self._running_here = running_here
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> RunView | None:
        """Read the record again; on ClusterDown keep the last view."""
        with contextlib.suppress(ClusterDown):
            self.view = await read_view(self.cluster)
            self._apply_metrics(self.view)
        return self.view

    async def start(self) -> None:
        """A first read (bounded by the Redis timeout), then one every second."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="olmd-sync-shared")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(_REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception:  # a bad record must not end the refreshes
                log.exception("sync.shared_refresh_failed")

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def merge_state(self, local: SyncState) -> SyncState:
        """The fleet's last run: the shared state, unless the local file's is newer (a run
        whose end Redis never heard of, or a Redis that lost its data). The newest full
        run counts from either, so a window's sync is never run twice for want of it."""
        shared = self.view.state if self.view is not None else None
        if shared is None or (local.fence or 0) > (shared.fence or 0):
            return local
        full = [t for t in (local.last_full_started_at, shared.last_full_started_at) if t]
        return shared.model_copy(update={"last_full_started_at": max(full, default=None)})

    def describe(self) -> dict[str, Any]:
        """``/admin/sync``'s ``cluster`` part: this gateway, Redis, the lease's holder."""
        view = self.view
        holder = view.holder if view is not None else None
        return {
            "gateway": self.cluster.name,
            "connected": self.cluster.connected,
            "holder": holder.gateway if holder is not None else None,
            "fence": view.fence if view is not None and view.fence else None,
            "last_run_by": view.gateway if view is not None else None,
        }

    def overlay(self, status: dict[str, Any], *, here: bool, own_fence: int) -> dict[str, Any]:
        """``status`` (this gateway's) with the fleet's run put in: the run going (unless
        it is this gateway's: its own progress is fresher), the last result, the state
        and the manifest, while the shared record is at least as new as this gateway's
        own last run (``own_fence``)."""
        view = self.view
        out = {**status, "cluster": self.describe()}
        if view is None or view.fence < own_fence:
            return out
        if not here:
            out.update(
                running=view.live,
                trigger=view.trigger,
                options=view.options,
                progress=view.progress,
            )
        if view.result is not None:
            out["last_result"] = view.result
            out["last_error"] = view.last_error
        if view.manifest is not None:
            out["manifest"] = view.manifest
        return out

    def _apply_metrics(self, view: RunView) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.running.set(1 if view.live or self._running_here() else 0)
        state = view.state
        if state is not None:
            metrics.restore(
                last_run=state.last_finished_at.timestamp() if state.last_finished_at else None,
                last_success=state.last_success_at.timestamp() if state.last_success_at else None,
            )
        result = view.result
        if result is None:
            return
        if isinstance(result.get("seconds"), int | float):
            metrics.duration.set(result["seconds"])
        for node, count in (result.get("models_present") or {}).items():
            metrics.models_present.labels(node=node).set(count)
        metrics.drift.set(len(result.get("drift") or []))
