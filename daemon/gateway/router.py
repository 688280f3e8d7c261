"""Choosing a node for a request: model-aware filtering, then the balancer plugin.

Only routable nodes that hold the model are candidates (every non-draining holder in
panic routing); among them, nodes with the model already loaded are preferred. A per-node
in-flight cap makes excess requests wait here, in a bounded queue with a deadline, rather
than in Ollama's own queue, which answers 503 unpredictably.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from daemon import registry
from daemon.domain import select_routable
from daemon.gateway.fleet import Fleet, Node
from daemon.ports import Balancer
from daemon.settings import RoutingSettings


class NoNode(Exception):
    """No node can take the request. ``status`` is what the client gets."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def make_balancer(strategy: str) -> Balancer:
    balancer: Balancer = registry.load("balancers", strategy)()
    return balancer


class Router:
    def __init__(
        self,
        fleet: Fleet,
        routing: RoutingSettings,
        clock: Callable[[], float],
    ) -> None:
        self.fleet = fleet
        self.clock = clock
        self.routing = routing
        self.balancer = make_balancer(routing.strategy)
        self.queued = 0
        self._freed = asyncio.Event()

    def reconfigure(self, routing: RoutingSettings) -> None:
        # A fresh balancer, as nginx starts fresh peers on reload: state built on the
        # old weights would skew the first rounds on the new ones.
        self.balancer = make_balancer(routing.strategy)
        self.routing = routing
        self._wake()  # a raised cap or new nodes may serve queued requests now

    def candidates(self, key: str, exclude: Collection[str] = ()) -> list[Node]:
        """Nodes that may serve ``key`` now, ignoring the in-flight cap.

        Raises NoNode (503) when nodes hold the model but all of them are draining.
        """
        now = self.clock()
        holders = [n for n in self.fleet if n.holds(key) and n.name not in exclude]
        selection = select_routable(holders, now, self.fleet.policy)
        self.fleet.panic = selection.panic
        if holders and not selection.nodes:
            # Not a 404: Ollama clients take that as "pull the model".
            raise NoNode(503, f"every node holding {key!r} is draining", retry_after=5)
        return list(selection.nodes)

    def _pick(self, key: str, exclude: Collection[str]) -> Node | None:
        nodes = self.candidates(key, exclude)
        if not nodes:
            raise NoNode(404, f"model {key!r} not found on any available node")
        cap = self.routing.max_in_flight_per_node
        if cap:
            nodes = [n for n in nodes if n.in_flight < cap]
            if not nodes:
                return None
        if self.routing.prefer_loaded:
            # Nodes with the model in memory first, while they have room: a cold load
            # elsewhere is paid only when they are full, so a cold node is not starved
            # under load, and light traffic does not wake models all over the fleet.
            loaded = [n for n in nodes if n.has_loaded(key)]
            if loaded:
                nodes = loaded
        node = self.balancer.choose(nodes)
        node.in_flight += 1
        return node

    async def acquire(self, key: str, exclude: Collection[str] = ()) -> Node:
        """A node for one attempt, its in-flight count taken; give it back with release."""
        node = self._pick(key, exclude)
        if node is not None:
            return node
        if self.queued >= self.routing.queue_limit:
            raise NoNode(503, "all nodes for this model are at capacity", retry_after=1)
        self.queued += 1
        try:
            async with asyncio.timeout(self.routing.queue_timeout):
                while node is None:
                    freed = self._freed
                    await freed.wait()
                    node = self._pick(key, exclude)
        except TimeoutError:
            raise NoNode(503, "timed out waiting for a node with capacity", retry_after=1) from None
        finally:
            self.queued -= 1
        return node

    def release(self, node: Node) -> None:
        node.in_flight -= 1
        if self.queued:
            self._wake()

    def _wake(self) -> None:
        # Wake every waiter; each re-checks its own candidates. Only used while the cap
        # is reached, so the herd is bounded by queue_limit.
        self._freed.set()
        self._freed = asyncio.Event()
