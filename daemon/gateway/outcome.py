"""What an answer's outcome is recorded as: request and token metrics, the rates routing
learns from the final chunk, and the tenant's ticket (counted when the request ends).

Per request, never per chunk: the proxy calls :meth:`Outcomes.observe` once an answer
has ended, with the answer's last bytes, where the final chunk's counts are found.
"""

from __future__ import annotations

import time
from typing import Any

from daemon.gateway.fleet import Node
from daemon.gateway.routing.rates import Sample
from daemon.gateway.routing.router import Route, Router
from daemon.gateway.wire import timings_from_tail, usage_from_tail
from daemon.metrics import Metrics

COLD_LOAD_NS = 100_000_000  # a load_duration this long was a model load, not bookkeeping


class Outcomes:
    def __init__(self, metrics: Metrics, router: Router) -> None:
        self.metrics = metrics
        self.router = router
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: labels() validates and locks each call."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            if len(self._children) > 50_000:  # label sets are bounded; this is a backstop
                self._children.clear()
            child = self._children[key] = metric.labels(*labels)
        return child

    def count(self, node: Node, key: str, path: str, status: int) -> None:
        self.child(self.metrics.requests, node.name, key, path, str(status)).inc()

    def observe(self, route: Route, path: str, status: int, started: float, tail: bytes) -> None:
        """An answer that ended with ``status``; ``tail`` its last bytes."""
        metrics, child = self.metrics, self.child
        node, key = route.node, route.key
        self.count(node, key, path, status)
        child(metrics.latency, path).observe(time.monotonic() - started)
        sample = timings_from_tail(tail)
        if status < 300:
            self.router.complete(route, sample)
            if sample is not None and sample.load_ns >= COLD_LOAD_NS:
                child(metrics.cold_loads, node.name, key).inc()
            if route.cached_tokens:
                child(metrics.cached_prompt_tokens, node.name, key).inc(route.cached_tokens)
        if sample is not None:  # Ollama's final chunk
            prompt, generated, eval_ns = sample.prompt_count, sample.eval_count, sample.eval_ns
        else:  # the usage the other APIs report, if any
            usage = usage_from_tail(tail)
            if usage is None:
                settle(route, None, None)
                return
            prompt, generated, eval_ns = usage
        settle(route, (prompt, generated), sample)
        child(metrics.tokens, node.name, key, "in").inc(prompt)
        child(metrics.tokens, node.name, key, "out").inc(generated)
        if eval_ns > 0 and generated > 0:
            child(metrics.tokens_per_second, key).observe(generated / (eval_ns / 1e9))


def settle(route: Route, counts: tuple[int, int] | None, sample: Sample | None) -> None:
    """What the answer used, on the tenant's ticket (counted when the request ends)."""
    ticket = route.ticket
    if ticket is None:
        return
    ticket.node, ticket.route = route.node.name, route.reason
    ticket.cached_tokens = route.cached_tokens
    if counts is not None:
        ticket.prompt_tokens, ticket.completion_tokens = counts
    if sample is not None:
        ticket.gpu_seconds = sample.total_ns / 1e9
