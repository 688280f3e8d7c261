"""Every metric olmd exports, on a registry owned by the running daemon (none global).

Names carry units, counters have no hand-written ``_total``, labels are bounded: nodes
come from settings, models from the fleet's own inventory, endpoints from a fixed table.
Node state is read from the fleet at scrape time by a custom collector.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from datetime import datetime
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from daemon import __version__
from daemon.domain import NodeHealth, NodeState

CONTENT_TYPE = CONTENT_TYPE_LATEST


# What the metrics read of the parts above the core (the gateway's fleet and router, the
# sync's result), as protocols: the core imports nothing of them.


class NodeStats(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def health(self) -> NodeHealth: ...
    @property
    def models(self) -> Sized: ...
    @property
    def loaded(self) -> Sized: ...
    @property
    def busy(self) -> Mapping[str, int]: ...
    def state(self, now: float) -> NodeState: ...


class FleetStats(Protocol):
    def panic_by_model(self, now: float) -> Mapping[str, bool]: ...
    def __iter__(self) -> Iterator[NodeStats]: ...


class QueueStats(Protocol):
    @property
    def queued_by(self) -> Mapping[str, int]: ...


class RouterStats(Protocol):
    @property
    def queued(self) -> int: ...
    @property
    def queue(self) -> QueueStats: ...
    def slots(self, node: Any) -> int: ...


class SyncOutcomeStats(Protocol):
    @property
    def node(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def status(self) -> str | None: ...


class ManifestStats(Protocol):
    @property
    def drift(self) -> Sized: ...


class SyncResultStats(Protocol):
    @property
    def outcomes(self) -> Sequence[SyncOutcomeStats]: ...
    @property
    def finished_at(self) -> datetime: ...
    @property
    def ok(self) -> bool: ...
    @property
    def manifest(self) -> ManifestStats | None: ...


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        Info("olmd_build", "olmd build information", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.ready = Gauge(
            "olmd_ready",
            "1 when the daemon accepts traffic, 0 while starting or draining",
            registry=r,
        )
        self.reloads = Gauge(
            "olmd_config_last_reload_success",
            "1 when the last settings reload succeeded, 0 when it was refused",
            registry=r,
        )
        self.reloads.set(1)
        self.cluster_connected = Gauge(
            "olmd_cluster_connected",
            "1 while the cluster's Redis server answers; 0 while it does not, or with the "
            "cluster off",
            registry=r,
        )
        # --- proxy -----------------------------------------------------------------------
        self.requests = Counter(
            "olmd_requests",
            "Proxied requests by node, model, endpoint and HTTP status",
            ["node", "model", "endpoint", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "olmd_request_duration_seconds",
            "Whole proxied request, until the last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "olmd_time_to_first_byte_seconds",
            "From the request's arrival to the first response byte from the node",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "olmd_tokens",
            "Tokens from the nodes' final chunks (in: prompt, out: generated)",
            ["node", "model", "direction"],
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "olmd_generation_tokens_per_second",
            "Generation speed reported by the node (eval_count / eval_duration)",
            ["model"],
            buckets=TPS_BUCKETS,
            registry=r,
        )
        # --- routing ---------------------------------------------------------------------
        self.route_decisions = Counter(
            "olmd_route_decisions",
            "Nodes chosen, by strategy and reason (affinity, warm, least-wait, rendezvous, "
            "weighted, failover; a classic strategy's own name)",
            ["strategy", "reason"],
            registry=r,
        )
        self.cold_loads = Counter(
            "olmd_cold_loads",
            "Answers that waited for their model to load on the node",
            ["node", "model"],
            registry=r,
        )
        self.cached_prompt_tokens = Counter(
            "olmd_route_cached_prompt_tokens",
            "Prompt tokens routing expected a node to hold in its cache already",
            ["node", "model"],
            registry=r,
        )
        self.ttft_estimated = Histogram(
            "olmd_route_estimated_ttft_seconds",
            "adaptive's estimate of the time to first token, per node chosen",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_measured = Histogram(
            "olmd_route_measured_ttft_seconds",
            "Measured time from dispatch to the node's first byte, per node",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "olmd_failovers",
            "Attempts retried on another node before the first byte",
            ["endpoint", "reason"],
            registry=r,
        )
        self.stream_errors = Counter(
            "olmd_stream_errors",
            "Streams a node cut after the first byte reached the client",
            ["node"],
            registry=r,
        )
        self.upstream_cancelled = Counter(
            "olmd_upstream_cancelled",
            "Node requests cancelled because the client went away",
            ["node"],
            registry=r,
        )
        self.rejected = Counter(
            "olmd_rejected_requests",
            "Requests answered by olmd itself without a node",
            ["endpoint", "code"],
            registry=r,
        )
        # Tenants: the label is bounded by the configured tenants (and "default").
        self.tenant_requests = Counter(
            "olmd_tenant_requests",
            "Requests per tenant and model, by status",
            ["tenant", "model", "code"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "olmd_tenant_tokens",
            "Tokens per tenant and model: prompt, cached (prompt tokens olmd expected "
            "cached on the node) and completion",
            ["tenant", "model", "kind"],
            registry=r,
        )
        self.tenant_gpu_seconds = Counter(
            "olmd_tenant_gpu_seconds",
            "Seconds nodes spent on a tenant's requests (the answers' total_duration)",
            ["tenant", "model"],
            registry=r,
        )
        self.tenant_queue_wait = Histogram(
            "olmd_tenant_queue_wait_seconds",
            "Seconds a tenant's requests waited in olmd for a slot",
            ["tenant"],
            buckets=(0.005, 0.05, 0.25, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.tenant_rate_limited = Counter(
            "olmd_tenant_rate_limited",
            "Requests refused with 429, by the limit that refused them",
            ["tenant", "limit"],
            registry=r,
        )
        self.tenant_in_flight = Gauge(
            "olmd_tenant_in_flight",
            "A tenant's requests admitted and not yet answered (waiting or running)",
            ["tenant"],
            registry=r,
        )
        # olmd_tenant_queued is read from the fleet-wide queue at scrape time (see
        # _FleetCollector), for every tenant that has had a request admitted.

    def watch_fleet(
        self, fleet: Callable[[], FleetStats], router: Callable[[], RouterStats]
    ) -> None:
        """Export node state from the live fleet at every scrape."""
        self.registry.register(_FleetCollector(fleet, router, self._tenants_seen))

    def _tenants_seen(self) -> list[str]:
        """Tenants with a request admitted since start (their in-flight gauge exists)."""
        return [
            s.labels["tenant"] for family in self.tenant_in_flight.collect() for s in family.samples
        ]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _FleetCollector(Collector):
    def __init__(
        self,
        fleet: Callable[[], FleetStats],
        router: Callable[[], RouterStats],
        tenants: Callable[[], Iterable[str]],
    ) -> None:
        self._fleet = fleet
        self._router = router
        self._tenants = tenants

    def collect(self) -> Iterable[Metric]:
        fleet, router = self._fleet(), self._router()
        now = time.monotonic()
        state = GaugeMetricFamily(
            "olmd_node_state", "1 for the state each node is in", labels=["node", "state"]
        )
        in_flight = GaugeMetricFamily(
            "olmd_node_in_flight_requests", "Requests in flight per node", labels=["node"]
        )
        cooldown = GaugeMetricFamily(
            "olmd_node_cooldown_remaining_seconds",
            "Seconds until a cooldown ends",
            labels=["node"],
        )
        ejections = CounterMetricFamily(
            "olmd_node_ejections",
            "Times each node was taken out for a cooldown",
            labels=["node"],
        )
        models = GaugeMetricFamily(
            "olmd_node_models", "Models each node holds (last probe)", labels=["node"]
        )
        loaded = GaugeMetricFamily(
            "olmd_node_loaded_models",
            "Models each node has in memory (last probe)",
            labels=["node"],
        )
        slots = GaugeMetricFamily(
            "olmd_node_slots", "Requests each node runs at once per model", labels=["node"]
        )
        in_use = GaugeMetricFamily(
            "olmd_node_slots_in_use",
            "olmd's requests in flight per node and model",
            labels=["node", "model"],
        )
        for node in fleet:
            current = node.state(now)
            for s in NodeState:
                state.add_metric([node.name, s.value], 1.0 if s is current else 0.0)
            in_flight.add_metric([node.name], node.in_flight)
            cooldown.add_metric([node.name], node.health.cooldown_remaining(now))
            ejections.add_metric([node.name], node.health.total_ejections)
            models.add_metric([node.name], len(node.models))
            loaded.add_metric([node.name], len(node.loaded))
            slots.add_metric([node.name], router.slots(node))
            for model, count in node.busy.items():
                in_use.add_metric([node.name, model], count)
        yield from (state, in_flight, cooldown, ejections, models, loaded, slots, in_use)
        yield GaugeMetricFamily(
            "olmd_queued_requests",
            "Requests waiting for a node under the in-flight cap",
            value=router.queued,
        )
        panic = GaugeMetricFamily(
            "olmd_panic_routing",
            "1 for a model too few of whose holders are routable: it is routed across all",
            labels=["model"],
        )
        for model, on in fleet.panic_by_model(now).items():
            panic.add_metric([model], 1.0 if on else 0.0)
        yield panic
        queued = GaugeMetricFamily(
            "olmd_tenant_queued",
            "A tenant's requests waiting in olmd for a slot",
            labels=["tenant"],
        )
        by_tenant = router.queue.queued_by
        for tenant in sorted({*self._tenants(), *by_tenant}):
            queued.add_metric([tenant], by_tenant.get(tenant, 0))
        yield queued


# --- model sync ---------------------------------------------------------------------

PULL_RESULTS = ("pulled", "failed", "deferred", "retried")


class SyncMetrics:
    """Everything a sync run reports. The engine calls the ``record_*`` methods."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.blocked = Gauge(
            "olmd_sync_blocked",
            "1 while no sync can start because the cluster's Redis does not answer",
            registry=registry,
        )
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
        self, result: SyncResultStats, models_present: Mapping[str, int], seconds: float
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


class DistributionMetrics:
    """The blob cache (``[distribution] mode = "gateway"``): bytes in and out, size, hits."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry_bytes = Counter(
            "olmd_distribution_registry_bytes",
            "Blob bytes downloaded from the registry into the cache",
            registry=registry,
        )
        self.served_bytes = Counter(
            "olmd_distribution_served_bytes",
            "Blob bytes served from the cache to the nodes",
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "olmd_distribution_cache_bytes",
            "Bytes of blobs in the cache",
            registry=registry,
        )
        self.lookups = Counter(
            "olmd_distribution_cache_lookups",
            "Blobs a model needed, by result: hit (in the cache) or miss (downloaded)",
            ["result"],
            registry=registry,
        )
        self.evicted_bytes = Counter(
            "olmd_distribution_evicted_bytes",
            "Blob bytes evicted from the cache to stay under max_cache_gb",
            registry=registry,
        )
