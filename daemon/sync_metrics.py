"""The sync engine's metrics, on an injected registry (the daemon's; none global).

Names carry units and counters no hand-written ``_total`` (the client adds it). Labels are
bounded: ``node`` comes from settings, ``result`` from a fixed set.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from daemon.sync_plan import SyncResult

__all__ = ["PULL_RESULTS", "SyncMetrics"]

PULL_RESULTS = ("pulled", "failed", "deferred", "retried")


class SyncMetrics:
    """Everything a sync run reports. The engine calls the ``record_*`` methods."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_success = Gauge(
            "olmd_sync_last_success_timestamp_seconds",
            "When the last sync that succeeded in every action finished (Unix time)",
            registry=registry,
        )
        self.last_run = Gauge(
            "olmd_sync_last_run_timestamp_seconds",
            "When the last sync finished, whatever its result (Unix time)",
            registry=registry,
        )
        self.duration = Gauge(
            "olmd_sync_last_duration_seconds",
            "How long the last sync took, from start to manifest written",
            registry=registry,
        )
        self.running = Gauge(
            "olmd_sync_running", "1 while a sync is running, else 0", registry=registry
        )
        self.pulls = Counter(
            "olmd_sync_pulls",
            "Model pulls by node and result: pulled, failed, deferred (window closed), "
            "retried (an attempt that failed and was tried again)",
            ["node", "result"],
            registry=registry,
        )
        self.pulled_bytes = Counter(
            "olmd_sync_pulled_bytes",
            "Bytes pulled onto each node, as the node reported its progress",
            ["node"],
            registry=registry,
        )
        self.models_present = Gauge(
            "olmd_sync_models_present",
            "Models each node held at the last sync that reached it",
            ["node"],
            registry=registry,
        )
        self.drift = Gauge(
            "olmd_sync_drift_models",
            "Models whose digest differs between nodes in the last manifest",
            registry=registry,
        )

    def record_pull(self, node: str, result: str) -> None:
        self.pulls.labels(node=node, result=result).inc()

    def record_bytes(self, node: str, count: int) -> None:
        if count > 0:
            self.pulled_bytes.labels(node=node).inc(count)

    def record_result(
        self, result: SyncResult, models_present: Mapping[str, int], seconds: float
    ) -> None:
        """A finished run: final pull results, models per node reached, times, drift."""
        for o in result.outcomes:
            if o.action == "pull" and o.status in ("pulled", "failed", "deferred"):
                self.record_pull(o.node, o.status)
        for node, count in models_present.items():
            self.models_present.labels(node=node).set(count)
        finished = result.finished_at.timestamp()
        self.last_run.set(finished)
        self.duration.set(seconds)
        if result.ok:
            self.last_success.set(finished)
        if result.manifest is not None:
            self.drift.set(len(result.manifest.drift))

    def restore(self, *, last_run: float | None, last_success: float | None) -> None:
        """Timestamps from the state file, so a restart does not reset them to zero."""
        if last_run is not None:
            self.last_run.set(last_run)
        if last_success is not None:
            self.last_success.set(last_success)
