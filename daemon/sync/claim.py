"""The right to run one sync, and where the run writes what it did.

* :class:`Recorder` writes a run's state file and manifest (the engine's default: one
  machine, no locks of its own).
* :class:`Claim` is a recorder that holds the locks for one run: the lock file (one
  machine) and, with the cluster on, the Redis sync lease with its fencing number
  (:mod:`daemon.cluster.lease`), renewed while the run lives. Its run's state, progress,
  result and manifest also go to the shared record (:mod:`daemon.sync.shared`), fenced.
  A claim whose lease is lost stops its engine (no pull starts; running ones are cut and
  recorded as deferred), and nothing it writes replaces a newer holder's: before the
  manifest is written the newest fence issued (Redis) and the one in the file are
  compared with the run's, and an older run raises :class:`FencedOut` instead.

:func:`take_claim` makes one, or raises :class:`~daemon.sync.state.SyncBusy` (another
run holds a lock) or :class:`SyncBlocked` (Redis does not answer: no sync starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from datetime import datetime

from daemon.cluster.client import Cluster, ClusterDown
from daemon.cluster.lease import Lease, LeaseHeld
from daemon.cluster.record import Fenced
from daemon.logs import get_logger
from daemon.settings import Settings
from daemon.sync.manifest import Manifest, write_manifest
from daemon.sync.plan import SyncOptions, SyncProgress, SyncResult
from daemon.sync.run_manifest import read_previous
from daemon.sync.shared import LEASE, RunView, read_manifest_copy, read_view, record_of
from daemon.sync.state import SyncBusy, SyncLock, SyncState, lock_path, read_state, state_path
from daemon.sync.state import write_state as _write_state
from daemon.sync.status import summarise

__all__ = ["Claim", "FencedOut", "Recorder", "SyncBlocked", "take_claim"]

log = get_logger("olmd.sync")

SCHEDULED = frozenset({"schedule", "catch-up"})
_PROGRESS_SECONDS = 0.5  # how often a running sync's progress goes to the shared record


class SyncBlocked(SyncBusy):
    """No sync can start: the cluster is on and its Redis does not answer (never two
    syncs: without the lease there is none)."""


class FencedOut(RuntimeError):
    """A newer holder of the sync lease exists: this run writes nothing more."""


class Recorder:
    """Writes a run's state file and manifest where the settings say."""

    fence: int | None = None
    gateway: str | None = None

    def __init__(self, settings: Settings) -> None:
        self.manifest_path = settings.jobs.ollama_sync.manifest_path
        self.state_path = state_path(self.manifest_path)

    def base_state(self) -> SyncState:
        """The last run's state, to update with this run's."""
        return read_state(self.state_path)

    def previous_manifest(self) -> Manifest | None:
        """The manifest this run's is merged with."""
        return read_previous(self.manifest_path)

    async def save_state(self, state: SyncState) -> None:
        _write_state(self.state_path, state)

    async def save_manifest(self, manifest: Manifest) -> Manifest:
        """Write ``manifest`` (atomically); the manifest as written."""
        write_manifest(self.manifest_path, manifest)
        return manifest

    async def finished(
        self, result: SyncResult, *, seconds: float, models_present: dict[str, int]
    ) -> None:
        """The run's result, once its manifest and state are written."""


class Claim(Recorder):
    """One run's locks; :meth:`release` them when the run ends (any way it ends)."""

    def __init__(
        self,
        settings: Settings,
        lock: SyncLock,
        *,
        lease: Lease | None = None,
        view: RunView | None = None,
        shared_manifest: Manifest | None = None,
    ) -> None:
        super().__init__(settings)
        self.settings = settings
        self.lock = lock
        self.lease = lease
        self.view = view
        """The shared record as it was when the lease was taken (cluster only)."""
        self._shared_manifest = shared_manifest
        self._state: SyncState | None = None
        self._fenced: str | None = None
        self._publisher: asyncio.Task[None] | None = None
        if lease is not None:
            self.fence, self.gateway = lease.fence, lease.cluster.name

    # -- what the scheduler asks before the run -------------------------------------------

    def ran_since(self, since: datetime) -> str | None:
        """Why a scheduled run for ``since`` is not needed: a full run that started at or
        after it already ran to its end (on any gateway); None if none did."""
        state = self.view.state if self.view is not None else None
        done = state.last_full_started_at if state is not None else None
        if done is None or done < since:
            return None
        by = f" on {state.gateway}" if state is not None and state.gateway else ""
        return f"the window's sync already ran{by} (started {done.isoformat(timespec='seconds')})"

    def resume(self, options: SyncOptions, trigger: str, now: datetime) -> SyncOptions:
        """Options for a takeover: when the shared record shows a full run of this window
        that never got to its end (its holder died, lost the lease, or was stopped), a
        scheduled full run skips the models already present, picking up where that one
        stopped."""
        view = self.view
        state = view.state if view is not None else None
        if (
            view is None
            or state is None
            or state.last_started_at is None
            or trigger not in SCHEDULED
            or not options.full
            or options.skip_existing
            or not _was_full(view.options)
        ):
            return options
        opening = self.settings.services.ollama.download.allowed_window.opening_for(now)
        started, completed = state.last_started_at, state.last_full_started_at
        if opening is None or started < opening or (completed is not None and completed >= started):
            return options
        log.warning("sync.takeover", previous=view.gateway, previous_fence=view.fence,
                    fence=self.fence, note="models already present are skipped")  # fmt: skip
        return options.model_copy(update={"skip_existing": True})

    # -- the run --------------------------------------------------------------------------

    async def begin(
        self, *, trigger: str, options: SyncOptions, stop: Callable[[str], None],
        progress: SyncProgress, now: datetime,
    ) -> None:  # fmt: skip
        """The run starts: renew the lease (``stop`` is called if it is lost) and publish
        the run and its progress."""
        lease = self.lease
        if lease is None:
            return

        def lost(reason: str) -> None:
            stop(f"lost the sync lease: {reason}")

        lease.keep(lost)
        await self._publish(
            {
                "gateway": lease.cluster.name,
                "running": "1",
                "trigger": trigger,
                "options": json.dumps(options.model_dump(mode="json")),
                "started": now.isoformat(),
                "progress": json.dumps(progress.snapshot()),
                "last_error": "",
            },
            stop,
        )
        self._publisher = asyncio.create_task(
            self._publish_progress(progress, stop), name="olmd-sync-progress"
        )

    async def _publish_progress(self, progress: SyncProgress, stop: Callable[[str], None]) -> None:
        while self._fenced is None:
            await asyncio.sleep(_PROGRESS_SECONDS)
            await self._publish({"progress": json.dumps(progress.snapshot())}, stop)

    async def _publish(self, fields: dict[str, str], stop: Callable[[str], None] | None) -> None:
        """Fields to the shared record; Redis down: skipped (the next write catches up);
        a newer holder: this run is fenced out, and stopped."""
        if self.lease is None or self._fenced is not None:
            return
        try:
            await record_of(self.lease.cluster).write(self.lease.fence, fields)
        except ClusterDown:
            return
        except Fenced as exc:
            self._fence_out(str(exc))
            if stop is not None:
                stop(f"fenced out: {exc}")

    def _fence_out(self, reason: str) -> None:
        if self._fenced is None:
            self._fenced = reason
            log.error("sync.fenced_out", fence=self.fence, reason=reason)

    def base_state(self) -> SyncState:
        if self._state is not None:
            return self._state
        local = read_state(self.state_path)
        shared = self.view.state if self.view is not None else None
        if shared is None or (local.fence or 0) > (shared.fence or 0):
            return local
        return shared

    def previous_manifest(self) -> Manifest | None:
        local = read_previous(self.manifest_path)
        shared = self._shared_manifest
        if shared is None or (local is not None and (local.fence or 0) > (shared.fence or 0)):
            return local
        return shared

    async def save_state(self, state: SyncState) -> None:
        if self._fenced is not None:
            return  # a newer run's state stands
        if self.lease is None:
            self._state = state
            await super().save_state(state)
            return
        state = state.model_copy(update={"fence": self.fence, "gateway": self.gateway})
        self._state = state
        local = read_state(self.state_path)
        if (local.fence or 0) > (self.fence or 0):
            log.warning("sync.state_kept", path=str(self.state_path), fence=local.fence,
                        ours=self.fence, reason="the file holds a newer run's state")  # fmt: skip
        else:
            await super().save_state(state)
        await self._publish({"state": state.model_dump_json()}, None)
        if self._fenced is not None:
            raise FencedOut(self._fenced)

    async def save_manifest(self, manifest: Manifest) -> Manifest:
        if self.lease is None:
            return await super().save_manifest(manifest)
        if self._fenced is not None:
            raise FencedOut(self._fenced)
        fence = self.lease.fence
        manifest = manifest.model_copy(update={"fence": fence, "gateway": self.gateway})
        record = record_of(self.lease.cluster)
        with contextlib.suppress(ClusterDown):  # unknown: the file's own fence still guards
            newest = await record.newest_fence()
            if newest > fence:
                self._refuse_manifest(f"fence {newest} was issued since (Redis)", newest)
        current = read_previous(self.manifest_path)
        if current is not None and (current.fence or 0) > fence:
            self._refuse_manifest(f"{self.manifest_path} was written under it", current.fence)
        write_manifest(self.manifest_path, manifest)
        summary = {"path": str(self.manifest_path), "gateway": self.gateway, "fence": fence,
                   **summarise(manifest)}  # fmt: skip
        await self._publish(
            {"manifest": manifest.model_dump_json(), "manifest_summary": json.dumps(summary)},
            None,
        )
        if self._fenced is not None:
            raise FencedOut(self._fenced)
        return manifest

    def _refuse_manifest(self, why: str, newest: int | None) -> None:
        reason = (
            f"a newer sync holds fence {newest} ({why}); this run's manifest (fence "
            f"{self.fence}) was not written, the newer one is kept"
        )
        self._fence_out(reason)
        raise FencedOut(reason)

    async def finished(
        self, result: SyncResult, *, seconds: float, models_present: dict[str, int]
    ) -> None:
        extra = {"seconds": round(seconds, 3), "models_present": models_present,
                 "gateway": self.gateway, "fence": self.fence}  # fmt: skip
        await self._publish({"result": json.dumps(result.to_dict() | extra)}, None)

    async def release(
        self, *, progress: SyncProgress | None = None, error: str | None = None
    ) -> None:
        """End the run: its last progress and ``running=0`` to the shared record, the
        lease released (left to expire when Redis does not answer), the lock file freed."""
        try:
            if self._publisher is not None:
                self._publisher.cancel()
                try:
                    await self._publisher
                except asyncio.CancelledError:
                    pass
                except Exception:  # the lease below must still be released
                    log.exception("sync.progress_publisher_failed")
            if self.lease is not None:
                fields = {"running": "0", "last_error": error or ""}
                if progress is not None:
                    fields["progress"] = json.dumps(progress.snapshot())
                if self.lease.held:
                    await self._publish(fields, None)
                await self.lease.close()
        finally:
            self.lock.release()


def _was_full(options: dict[str, object] | None) -> bool:
    try:
        return SyncOptions.model_validate(options or {}).full
    except ValueError:  # a newer olmd's options: not a takeover this one understands
        return False


def _fence_floor(settings: Settings, known: int) -> int:
    """The highest fence this gateway knows of: its state file's, its manifest's, the
    shared record's it last read (``known``). A new lease's fence is above it, even
    from a Redis that lost its data."""
    path = settings.jobs.ollama_sync.manifest_path
    local = read_state(state_path(path)).fence or 0
    manifest = read_previous(path)
    return max(local, (manifest.fence or 0) if manifest is not None else 0, known)


async def take_claim(settings: Settings, cluster: Cluster | None, *, known_fence: int = 0) -> Claim:
    """The locks for one run: the lock file, and with ``cluster`` the sync lease (and the
    shared record as it stands under it). Raises SyncBusy or SyncBlocked."""
    lock = SyncLock(lock_path(settings.jobs.ollama_sync.manifest_path))
    lock.acquire()
    if cluster is None:
        return Claim(settings, lock)
    lease = None
    try:
        lease = await Lease.acquire(
            cluster, LEASE, seconds=settings.cluster.lease_seconds,
            floor=_fence_floor(settings, known_fence),
        )  # fmt: skip
        view = await read_view(cluster)
        shared_manifest = await read_manifest_copy(cluster)
    except LeaseHeld as exc:
        lock.release()
        raise SyncBusy(f"another sync is running: {exc}") from None
    except ClusterDown as exc:
        if lease is not None:
            await lease.close()
        lock.release()
        raise SyncBlocked(
            f"the cluster's Redis does not answer ({exc}): no sync starts until it does"
        ) from None
    except BaseException:
        if lease is not None:
            await lease.close()
        lock.release()
        raise
    return Claim(settings, lock, lease=lease, view=view, shared_manifest=shared_manifest)
