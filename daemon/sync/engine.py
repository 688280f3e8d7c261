"""The sync engine: inventory, plan, pull with a parallelism cap, retries and a stall
watchdog, stop at the window's close, write the manifest and the state file.

Use it through :mod:`daemon.sync.service` (``run_sync``, ``SyncService``), which holds the lock.
Its parts: :mod:`daemon.sync.plan`, :mod:`daemon.sync.inventory`, :mod:`daemon.sync.run_manifest`,
:mod:`daemon.sync.watchdog` (one pull, cancelled when it stalls).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Literal

import aiohttp

from daemon import registry
from daemon.distribution.mirror import Distributor
from daemon.domain import ModelRef
from daemon.logs import get_logger
from daemon.metrics import SyncMetrics
from daemon.ports import PullError, PullTransport
from daemon.settings import Settings
from daemon.sync.claim import Recorder
from daemon.sync.inventory import check_pulled
from daemon.sync.inventory import inventory_all as _inventory_all  # tests patch this name
from daemon.sync.mirror import CacheStep, MirroredTransport, cache_models, registry_record
from daemon.sync.plan import (
    Inventory,
    Outcome,
    SyncOptions,
    SyncProgress,
    SyncResult,
    Target,
    build_plan,
    select_models,
    select_targets,
)
from daemon.sync.run_manifest import build_run_manifest
from daemon.sync.watchdog import watch_pull

__all__ = ["Backoff", "Clock", "Now", "SyncEngine", "TransportFactory", "never_found", "utcnow"]

log = get_logger("olmd.sync")

Now = Callable[[], datetime]
Clock = Callable[[], float]
Backoff = Callable[[int], float]
"""Seconds to wait after failed attempt number ``n`` (1-based) before the next one."""
TransportFactory = Callable[[str], PullTransport]
"""A transport for a name from settings ("http", "ssh"); default: the plugin registry."""

_BACKOFF_CAP = 900.0  # growing waits stop growing at 15 minutes

# What a registry says of a name it does not have. Ollama turns the registry's 404 into
# os.ErrNotExist: "pull model manifest: file does not exist" (HTTP stream or `ollama pull`
# over SSH alike); other registries say "manifest unknown" or "... not found". A shell's
# "command not found" is not about the model.
_NOT_FOUND = re.compile(
    r"file does not exist|manifest unknown|(?<!command )\bnot found\b", re.IGNORECASE
)


def never_found(message: str) -> bool:
    """Whether a pull failed because the registry does not have the model: retrying
    cannot help, whatever the transport thought."""
    return _NOT_FOUND.search(message) is not None


def utcnow() -> datetime:
    return datetime.now(UTC)


def _registry_transport(name: str) -> PullTransport:
    transport: PullTransport = registry.load("transports", name)()
    return transport


class SyncEngine:
    """One run. Make one per run; :meth:`run` once. The caller holds the lock.

    ``now`` is the wall clock (window decisions, the manifest's times), ``clock`` the
    monotonic one (durations); tests pass fakes. The window's close is turned into a
    deadline on the event loop's clock when pulls start.
    """

    def __init__(
        self,
        settings: Settings,
        options: SyncOptions,
        *,
        now: Now = utcnow,
        clock: Clock = time.monotonic,
        progress: SyncProgress | None = None,
        metrics: SyncMetrics | None = None,
        transports: TransportFactory | None = None,
        backoff: Backoff | None = None,
        rng: random.Random | None = None,
        recorder: Recorder | None = None,
        distributor: Distributor | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.progress = progress or SyncProgress()
        self._now = now
        self._clock = clock
        self._metrics = metrics
        self._record = recorder or Recorder(settings)
        self._make_transport = transports or _registry_transport
        self._rng = rng or random.Random()
        self._backoff = backoff or self._default_backoff
        self._download = settings.services.ollama.download
        self._stop = asyncio.Event()
        self._stop_reason: str | None = None
        self._closing = False  # once set, no pull starts
        self._interrupted = False  # stop() cut pulls short: not the window's finished sync
        self._node_fatal: dict[str, str] = {}
        self._gateway = settings.distribution.mode == "gateway"
        self._distributor = distributor
        self._cached: dict[str, CacheStep] = {}  # gateway mode: the cache step per model
        self._registry_failed = False

    def stop(self, reason: str) -> None:
        """End the run early, as the window's close does: no new pull starts, running ones
        are cancelled and recorded as deferred, and the manifest is still written."""
        self._stop_reason = self._stop_reason or reason
        self._stop.set()

    async def run(self) -> SyncResult:
        started, t0 = self._now(), self._clock()
        options, window = self.options, self._download.allowed_window
        targets = select_targets(self.settings, options.host)
        models = select_models(self.settings, options)
        manifest_path = self.settings.jobs.ollama_sync.manifest_path
        log.info("sync.started", options=options.model_dump(mode="json"), nodes=len(targets))
        timeout = aiohttp.ClientTimeout(total=self.settings.services.ollama.health_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.progress.phase = "inventory"
            inventories = await _inventory_all(session, targets)
            plan = build_plan(targets, models, inventories, options)
            outcomes = [Outcome.start(p) for p in plan]
            self.progress.set_plan(plan)
            if options.dry_run:
                self.progress.phase = "done"
                return SyncResult(options, started, self._now(), str(window), plan, outcomes)
            await self._save_state(started, "running")
            try:
                pulls = [o for o in outcomes if o.action == "pull"]
                if self._gateway:
                    self._distributor = self._distributor or Distributor(self.settings, session)
                if self._gateway and pulls:
                    self.progress.phase = "caching"
                    await self._cache(pulls)
                    pulls = [o for o in pulls if o.status is None]
                if pulls:
                    self.progress.phase = "pulling"
                    await self._execute(pulls, {t.name: t for t in targets})
                self.progress.phase = "verifying"
                reachable = [t for t in targets if inventories[t.name].reachable]
                after = await _inventory_all(session, reachable)
                # A node that answered before the pulls but not now: what it did is
                # unknown, so its pulls stay as reported and the node is marked stale.
                lost = {
                    k: v.error or "node unreachable" for k, v in after.items() if not v.reachable
                }
                if lost:
                    log.warning("sync.final_inventory_failed", nodes=lost)
                final = {**inventories, **{k: v for k, v in after.items() if v.reachable}}
                check_pulled(outcomes, final, lost)
                result = await self._write(
                    SyncResult(options, started, started, str(window), plan, outcomes),
                    targets,
                    final,
                    lost,
                )
            except Exception as exc:
                await self._save_state(started, "error", error=str(exc))
                raise
        result.finished_at = self._now()
        await self._save_state(started, "ok" if result.ok else "failed", result=result)
        present = {
            name: len(inv.models)
            for name, inv in final.items()
            if inv.reachable and name not in lost
        }
        if self._metrics is not None:
            self._metrics.record_result(result, present, self._clock() - t0)
        await self._record.finished(result, seconds=self._clock() - t0, models_present=present)
        self.progress.phase = "done"
        log.info(
            "sync.finished",
            ok=result.ok,
            counts=result.counts(),
            stopped=result.stopped,
            manifest=str(manifest_path),
            seconds=round(self._clock() - t0, 3),
        )
        return result

    # -- pulls ---------------------------------------------------------------------------

    async def _cache(self, pulls: list[Outcome]) -> None:
        """Gateway mode's first step (:func:`cache_models`): each model's pulls fail when
        the registry failed it, wait when it cannot be downloaded outside the window, and
        are cut as deferred when the run stops or the window closes meanwhile."""
        assert self._distributor is not None
        models = list(dict.fromkeys(o.model for o in pulls))
        run = await cache_models(
            self._distributor, models, self._download.allowed_window, self._now(),
            ignore_window=self.options.ignore_window, stop=self._stop,
        )  # fmt: skip
        self._cached = run.steps
        for o in pulls:
            step = run.steps.get(o.model)
            if step is None:
                continue
            if step.error is not None:
                self._registry_failed = True
                self._finish(o, "failed", f"{o.node}: {step.error}")
            elif step.deferred is not None:
                o.status, o.error = "deferred", f"deferred before the pull started: {step.deferred}"
                self.progress.update(o.node, o.model, state="done", result="deferred",
                                     error=o.error)  # fmt: skip
        if run.cut is not None:
            self._stop_reason = self._stop_reason or run.cut
            self._defer(o for o in pulls if o.status is None)

    async def _execute(self, pulls: list[Outcome], targets: dict[str, Target]) -> None:
        window = self._download.allowed_window
        budget: float | None = None
        closes_at = ""
        # Gateway mode: the registry downloads were the window's business; pulls from
        # olmd's cache run over the LAN, at any time unless settings say otherwise.
        anytime = self._gateway and self.settings.distribution.fanout_outside_window
        if not self.options.ignore_window and not anytime:
            at = self._now()
            close = window.current_close(at)
            if close is None:
                opens = window.next_open(at).astimezone(window.tz)
                self._stop_reason = (
                    f"outside the allowed download window {window} (next opens "
                    f"{opens:%Y-%m-%d %H:%M}); pulls deferred, --ignore-window pulls now"
                )
                self._defer(pulls)
                return
            budget = (close - at).total_seconds()
            closes_at = f"{close.astimezone(window.tz):%H:%M} {window.zone}"
        slots = asyncio.Semaphore(self._download.max_parallel_jobs)
        transports: dict[str, PullTransport] = {}
        for name in {targets[o.node].transport for o in pulls}:
            transport = self._make_transport(name)
            if self._gateway:
                transport = MirroredTransport(transport, name, self.settings)
            transports[name] = transport
        tasks = {
            asyncio.create_task(
                self._pull(o, targets[o.node], transports[targets[o.node].transport], slots),
                name=f"olmd-sync {o.node} {o.model}",
            ): o
            for o in pulls
        }
        stop_waiter = asyncio.create_task(self._stop.wait())
        loop = asyncio.get_running_loop()
        deadline = None if budget is None else loop.time() + budget
        pending: set[asyncio.Task[None]] = set(tasks)
        try:
            while pending and not self._stop.is_set():
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    self._stop_reason = self._stop_reason or f"the window closed at {closes_at}"
                    break
                done, _ = await asyncio.wait(
                    {*pending, stop_waiter}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
        finally:
            # Also on our own cancellation: every pull task is cancelled and awaited here.
            self._closing = True
            stop_waiter.cancel()
            for task in pending:
                task.cancel()
            await asyncio.wait({*pending, stop_waiter})
            for transport in transports.values():
                try:
                    await transport.aclose()
                except Exception as exc:  # one transport's cleanup must not hide results
                    log.warning("sync.transport_close_failed", error=str(exc))
        if pending:
            log.warning("sync.pulls_cut", reason=self._stop_reason, cancelled=len(pending))
        cut = [o for o in pulls if o.status is None]
        if cut and self._stop.is_set():
            self._interrupted = True
        self._defer(cut)

    def _defer(self, outcomes: Iterable[Outcome]) -> None:
        for o in outcomes:
            o.status = "deferred"
            when = f"during attempt {o.attempts}" if o.attempts else "before the pull started"
            o.error = f"deferred {when}: {self._stop_reason}"
            self.progress.update(o.node, o.model, state="done", result="deferred", error=o.error)

    async def _pull(
        self, o: Outcome, target: Target, transport: PullTransport, slots: asyncio.Semaphore
    ) -> None:
        """Every attempt at one pull. Leaves ``o.status`` None when cut short (deferred).

        ``o.seconds`` counts from the start of the first attempt, not from the wait for a
        free slot before it: the summary shows how long the pull itself took."""
        started: float | None = None
        attempts = self.settings.services.ollama.download.retry.max_attempts
        try:
            ModelRef.parse(o.model)
        except ValueError as exc:  # retrying cannot help; no transport sees the name
            self._finish(o, "failed", f"{target.name}: {exc}")
            return
        try:
            for attempt in range(1, attempts + 1):
                async with slots:
                    if self._closing:
                        return
                    fatal = self._node_fatal.get(target.name)
                    if fatal is not None:
                        self._finish(o, "failed", fatal)
                        return
                    o.attempts = attempt
                    if started is None:
                        started = self._clock()
                    error = await self._attempt(o, target, transport)
                if error is None:
                    self._finish(o, "pulled", None)
                    return
                if error.node_fatal:
                    self._node_fatal[target.name] = str(error)
                if not error.retryable or attempt == attempts or never_found(str(error)):
                    self._finish(o, "failed", str(error))
                    return
                wait = self._backoff(attempt)
                log.warning(
                    "sync.pull_retry",
                    node=o.node,
                    model=o.model,
                    attempt=attempt,
                    max_attempts=attempts,
                    wait_seconds=round(wait, 3),
                    error=str(error),
                )
                if self._metrics is not None:
                    self._metrics.record_pull(o.node, "retried")
                o.error = str(error)
                self.progress.update(o.node, o.model, state="waiting", error=o.error)
                await asyncio.sleep(wait)
        finally:
            o.seconds = 0.0 if started is None else self._clock() - started

    async def _attempt(
        self, o: Outcome, target: Target, transport: PullTransport
    ) -> PullError | None:
        """One attempt, watched for stalls; the failure as a PullError, None on success."""
        error = await self._watched(o, target, transport)
        if error is None or target.hidden is None:
            return error
        # A secret address (OLLAMA_REMOTE_HOST) must not reach logs, the manifest or /admin.
        return PullError(
            target.redact(str(error)), retryable=error.retryable, node_fatal=error.node_fatal
        )

    async def _watched(
        self, o: Outcome, target: Target, transport: PullTransport
    ) -> PullError | None:
        counted = 0

        def on_progress(status: str, completed: int, total: int) -> None:
            nonlocal counted
            if self._metrics is not None and completed > counted:
                self._metrics.record_bytes(o.node, completed - counted)
            counted = max(counted, completed)
            self.progress.update(
                o.node, o.model, state="pulling", attempt=o.attempts, status=status,
                completed=completed, total=total,
            )  # fmt: skip

        self.progress.update(o.node, o.model, state="pulling", attempt=o.attempts)
        return await watch_pull(
            transport, target, o.model, on_progress, stall_timeout=self._download.stall_timeout
        )

    def _finish(self, o: Outcome, status: Literal["pulled", "failed"], error: str | None) -> None:
        o.status, o.error = status, error
        log_event = log.info if o.status == "pulled" else log.error
        log_event(f"sync.pull_{o.status}", node=o.node, model=o.model, attempts=o.attempts,
                  error=error)  # fmt: skip
        self.progress.update(o.node, o.model, state="done", result=o.status, error=error)

    def _default_backoff(self, attempt: int) -> float:
        base = self._download.retry.backoff_seconds
        # Doubling per attempt; jitter keeps nodes that failed together from retrying in step.
        grown = min(_BACKOFF_CAP, base * 2.0 ** (attempt - 1))
        return grown * self._rng.uniform(0.8, 1.2)

    # -- results -------------------------------------------------------------------------

    async def _write(
        self,
        result: SyncResult,
        targets: list[Target],
        final: dict[str, Inventory],
        lost: dict[str, str],
    ) -> SyncResult:
        """Write the manifest (through the recorder, which may refuse: FencedOut)."""
        previous = self._record.previous_manifest()
        result.manifest_path = self._record.manifest_path
        result.stopped = self._stop_reason
        changed = any(o.status == "pulled" for o in result.outcomes)
        if self._registry_failed and previous is not None and not changed:
            # No node changed and the registry failed us: the good manifest stays as it
            # was; the state file and the run's result say what failed.
            log.warning("sync.manifest_kept", reason="the registry step failed; no node changed")
            result.manifest = previous
            return result
        manifest = build_run_manifest(
            self.settings, self.options, result, targets, final, lost,
            generated_at=self._now(), previous=previous,
        )  # fmt: skip
        if self._gateway and self._distributor is not None:
            models = select_models(self.settings, self.options)
            record = registry_record(self._distributor, models, self._cached, final, previous)
            manifest = manifest.model_copy(update={"registry": record})
        result.manifest = await self._record.save_manifest(manifest)
        return result

    async def _save_state(
        self,
        started: datetime,
        outcome: str,
        *,
        error: str | None = None,
        result: SyncResult | None = None,
    ) -> None:
        current = self._record.base_state()
        update: dict[str, object] = {"last_started_at": started, "last_outcome": outcome}
        if outcome != "running":
            update.update(last_finished_at=self._now(), last_error=error)
        if result is not None:
            if result.ok:
                update["last_success_at"] = update["last_finished_at"]
            # Only a run that went to its end (or to the window's close) is the window's
            # sync; one cut by stop() is resumed by the next catch-up.
            if self.options.full and not self._interrupted:
                update["last_full_started_at"] = started
            failed = [o for o in result.outcomes if not o.ok]
            update["last_error"] = failed[0].error if failed else None
        await self._record.save_state(current.model_copy(update=update))
