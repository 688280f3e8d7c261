"""Choosing a node for a request: routable holders with a free slot, then the strategy.

Only routable nodes that hold the model are candidates (every non-draining holder in
panic routing), and of those only nodes with a free slot for the model: a node runs
``parallel`` requests at once per model (its ``OLLAMA_NUM_PARALLEL``), plus
``overcommit``. A request that finds no free slot waits in one fleet-wide queue, first
come first served per model, and goes to whichever holder frees a slot first; after
``queue_timeout``, or beyond ``queue_limit`` waiting, it gets 503.

A classic balancer (``weighted``, ``round_robin``, ``least_busy``) picks among the
candidates as defined, whatever is loaded where. A cost balancer (``adaptive``) gets,
per candidate, what the fleet knows: slots in use, the learned load time, prompt rate and
service time (:mod:`daemon.gateway.rates`), and the prompt tokens the node's slots
probably hold (:mod:`daemon.gateway.affinity`). Completed requests teach both.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from daemon import registry
from daemon.domain import select_routable
from daemon.gateway.affinity import PrefixIndex
from daemon.gateway.fleet import Fleet, Node
from daemon.gateway.prompts import EMPTY, Prompt
from daemon.gateway.rates import Defaults, Rates, Sample
from daemon.ports import Balancer, Candidate, CostBalancer, RouteRequest
from daemon.settings import RoutingSettings

_REPOLL = 0.5  # a waiter looks again this often (a node back from cooldown frees no slot)
_MAX_SESSIONS = 100_000


class NoNode(Exception):
    """No node can take the request. ``status`` is what the client gets."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(eq=False, slots=True)
class Route:
    """One attempt's node and why, its slot taken; give it back with ``Router.release``."""

    node: Node
    key: str
    reason: str
    estimate: float | None = None  # seconds to the first token, for a cost balancer
    cached_tokens: int = 0
    expected_cold: bool = False
    started: float = 0.0
    prompt: Prompt = EMPTY
    session: str | None = None
    released: bool = False


@dataclass(eq=False)
class _Waiter:
    request: RouteRequest
    prompt: Prompt
    exclude: Collection[str]
    future: asyncio.Future[Route] = field(repr=False)
    # A cost balancer chose a node without a free slot (its cache is worth the wait):
    # only that node serves this waiter until ``prefer_until`` (the loop's clock).
    prefer: str | None = None
    prefer_reason: str = ""
    prefer_until: float = 0.0
    preferred_once: bool = False  # a waiter waits for one node at most once


@dataclass(frozen=True, slots=True)
class _Wait:
    """``_pick``'s answer when the choice is a node without a free slot: wait for it."""

    node: Node
    patience: float
    reason: str


def make_balancer(routing: RoutingSettings) -> Balancer:
    balancer: Balancer = registry.load("balancers", routing.strategy)()
    if hasattr(balancer, "pin_tolerance"):
        balancer.pin_tolerance = routing.pin_tolerance
    return balancer


def _defaults(routing: RoutingSettings) -> Defaults:
    return Defaults(
        load_seconds=routing.cold_load_seconds,
        seconds_per_prompt_token=1 / routing.prompt_tokens_per_second,
        service_seconds=routing.service_seconds,
    )


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
        self.balancer = make_balancer(routing)
        self.index = PrefixIndex(routing.affinity_entries_per_slot)
        self.rates = Rates(_defaults(routing))
        self.sessions: OrderedDict[str, str] = OrderedDict()
        self.recent_pins: dict[str, str] = {}  # pins since the cluster last published
        self.queued = 0
        self._queue: dict[str, deque[_Waiter]] = {}
        self._waiting_for: dict[str, int] = {}  # node → waiters preferring it
        fleet.on_forget = self.index.drop

    @property
    def cost_aware(self) -> bool:
        """Whether the strategy weighs costs, and so wants each request's prompt read."""
        return isinstance(self.balancer, CostBalancer)

    def reconfigure(self, routing: RoutingSettings, balancer: Balancer | None = None) -> None:
        # A fresh balancer, as nginx starts fresh peers on reload: state built on the
        # old weights would skew the first rounds on the new ones. What was learned about
        # the nodes stays true and is kept.
        self.balancer = balancer if balancer is not None else make_balancer(routing)
        self.routing = routing
        self.index.entries_per_slot = routing.affinity_entries_per_slot
        self.rates.defaults = _defaults(routing)
        self._dispatch()  # more slots or new nodes may serve queued requests now

    def slots(self, node: Node) -> int:
        return node.config.parallel or self.routing.parallel

    def candidates(self, key: str, exclude: Collection[str] = ()) -> list[Node]:
        """Nodes that may serve ``key`` now, ignoring their slots.

        Raises NoNode (503) when nodes hold the model but all of them are draining.
        """
        now = self.clock()
        holders = [n for n in self.fleet if n.holds(key) and n.name not in exclude]
        # Nodes another gateway of the cluster took out are skipped too, unless that
        # leaves none (then select_routable's own rules decide, as without a cluster).
        ours = [n for n in holders if n.peer_out_until <= now]
        if ours and len(ours) < len(holders):
            holders = ours
        selection = select_routable(holders, now, self.fleet.policy)
        if holders and not selection.nodes:
            # Not a 404: Ollama clients take that as "pull the model".
            raise NoNode(503, f"every node holding {key!r} is draining", retry_after=5)
        return list(selection.nodes)

    def _has_room(self, node: Node, key: str) -> bool:
        cap = self.routing.max_in_flight_per_node
        if cap and node.in_flight >= cap:
            return False
        in_flight = node.busy.get(key, 0) + node.peer_busy.get(key, 0)
        return in_flight < self.slots(node) + self.routing.overcommit

    def _pick(
        self,
        request: RouteRequest,
        prompt: Prompt,
        exclude: Collection[str],
        *,
        prefer: str | None = None,
        may_wait: bool = True,
    ) -> Route | _Wait | None:
        """A route on a node with a free slot; a _Wait when the cost balancer would rather
        wait for a busy node (only with ``may_wait``); None when no node has room.
        ``prefer`` restricts the choice to that node."""
        key = request.model
        nodes = self.candidates(key, exclude)
        if not nodes:
            raise NoNode(404, f"model {key!r} not found on any available node")
        if prefer is not None:
            nodes = [n for n in nodes if n.name == prefer]
        free = [n for n in nodes if self._has_room(n, key)]
        balancer = self.balancer
        if isinstance(balancer, CostBalancer) and (free or (may_wait and nodes)):
            candidates = self._candidates(request, prompt, nodes if may_wait else free)
            choice = balancer.select(request, candidates)
            chosen = next(c for c in candidates if c.node is choice.node)
            if not chosen.room:
                return _Wait(chosen.node, choice.patience, choice.reason)
            route = Route(
                choice.node,
                key,
                choice.reason,
                estimate=choice.estimate,
                cached_tokens=chosen.cached_tokens,
                expected_cold=chosen.load_seconds > 0,
                prompt=prompt,
                session=request.session,
            )
            if prompt.hashes:
                # The node's slot holds this prompt from now on (once evaluated): say so
                # at once, so that conversations placed meanwhile see the node filling.
                self.index.record(choice.node.name, key, prompt.hashes, self.slots(choice.node))
        elif free:
            node = balancer.choose(free)
            route = Route(node, key, self.routing.strategy, expected_cold=not node.has_loaded(key))
        else:
            return None
        node = route.node
        node.in_flight += 1
        node.busy[key] = node.busy.get(key, 0) + 1
        route.started = self.clock()
        return route

    def _candidates(
        self, request: RouteRequest, prompt: Prompt, nodes: list[Node]
    ) -> list[Candidate[Node]]:
        key, rates = request.model, self.rates
        matched = self.index.cached(key, prompt.hashes, (n.name for n in nodes))
        pinned = self.sessions.get(request.session) if request.session else None
        # How many segments a prefix must cover to include the conversation's own start.
        own = prompt.hashes.index(prompt.conversation) + 1 if prompt.conversation else 0
        out = []
        for n in nodes:
            segments = matched.get(n.name, 0)
            out.append(
                Candidate(
                    node=n,
                    slots=self.slots(n),
                    busy=n.busy.get(key, 0) + n.peer_busy.get(key, 0),
                    load_seconds=0.0 if n.has_loaded(key) else self._load_cost(n, key),
                    seconds_per_prompt_token=rates.seconds_per_prompt_token(n.name, key),
                    service_seconds=rates.service_seconds(n.name, key),
                    cached_tokens=prompt.tokens[segments - 1] if segments else 0,
                    has_conversation=bool(own) and segments >= own,
                    pinned=n.name == pinned,
                    room=self._has_room(n, key),
                    waiting=self._waiting_for.get(n.name, 0),
                    held=self.index.held(n.name, key),
                    capacity=self.slots(n) * self.index.entries_per_slot,
                )
            )
        return out

    def _load_cost(self, node: Node, key: str) -> float:
        cost = self.rates.load_seconds(node.name, key)
        limit = node.config.max_loaded_models
        if limit and len(node.loaded) >= limit:
            # Loading evicts a resident model (Ollama picks an idle one, or waits for one
            # to finish): whoever needs it next pays its load again, and while every
            # resident model is busy the load waits for one to drain.
            rates = self.rates
            cost += min(
                rates.load_seconds(node.name, m)
                + (rates.service_seconds(node.name, m) if node.busy.get(m) else 0.0)
                for m in node.loaded
            )
        return cost

    async def acquire(
        self, request: RouteRequest, prompt: Prompt = EMPTY, exclude: Collection[str] = ()
    ) -> Route:
        """A node for one attempt, its slot taken; give it back with :meth:`release`."""
        key = request.model
        wait: _Wait | None = None
        if not self._queue.get(key):  # first come, first served: no overtaking waiters
            picked = self._pick(request, prompt, exclude)
            if isinstance(picked, Route):
                return picked
            wait = picked
        else:
            self.candidates(key, exclude)  # a 503 for a draining fleet comes at once
        if self.queued >= self.routing.queue_limit:
            raise NoNode(503, "all nodes for this model are at capacity", retry_after=1)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Route] = loop.create_future()
        waiter = _Waiter(request, prompt, exclude, future)
        if wait is not None:
            self._prefer(waiter, wait, loop.time())
        queue = self._queue.setdefault(key, deque())
        queue.append(waiter)
        self.queued += 1
        try:
            async with asyncio.timeout(self.routing.queue_timeout):
                self._dispatch(key)
                while not future.done():
                    step = _REPOLL
                    if waiter.prefer is not None:
                        step = min(step, max(0.0, waiter.prefer_until - loop.time()) + 0.001)
                    await asyncio.wait((future,), timeout=step)
                    if not future.done():
                        self._dispatch(key)
        except TimeoutError:
            if not future.done():
                raise NoNode(
                    503, "timed out waiting for a node with capacity", retry_after=1
                ) from None
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # a slot handed over just as the client left
            raise
        finally:
            self.queued -= 1
            self._unprefer(waiter)
            if not future.done():
                future.cancel()
            if waiter in queue:
                queue.remove(waiter)
            if not queue and self._queue.get(key) is queue:
                del self._queue[key]
        return future.result()

    def _still_holds(self, waiter: _Waiter) -> bool:
        """Whether the node a waiter waits for can still serve it (routable, has it)."""
        try:
            nodes = self.candidates(waiter.request.model, waiter.exclude)
        except NoNode:
            return False
        return any(n.name == waiter.prefer for n in nodes)

    def _prefer(self, waiter: _Waiter, wait: _Wait, now: float) -> None:
        waiter.prefer = wait.node.name
        waiter.prefer_reason = wait.reason
        waiter.prefer_until = now + wait.patience
        waiter.preferred_once = True
        self._waiting_for[wait.node.name] = self._waiting_for.get(wait.node.name, 0) + 1

    def _unprefer(self, waiter: _Waiter) -> None:
        name = waiter.prefer
        if name is None:
            return
        waiter.prefer = None
        left = self._waiting_for.get(name, 0) - 1
        if left > 0:
            self._waiting_for[name] = left
        else:
            self._waiting_for.pop(name, None)

    def release(self, route: Route) -> None:
        if route.released:
            return
        route.released = True
        node, key = route.node, route.key
        node.in_flight -= 1
        left = node.busy.get(key, 0) - 1
        if left > 0:
            node.busy[key] = left
        else:
            node.busy.pop(key, None)
        if self.queued:
            self._dispatch(key)

    def complete(self, route: Route, sample: Sample | None) -> None:
        """An attempt answered in full: learn from it, remember where its prompt now is."""
        node, key = route.node, route.key
        self.fleet.mark_loaded(node, key)
        if sample is not None:
            held = Sample(
                sample.load_ns,
                sample.prompt_count,
                sample.prompt_ns,
                sample.eval_count,
                sample.eval_ns,
                held_seconds=self.clock() - route.started,
            )
            self.rates.learn(
                node.name, key, held, expected_cold=route.expected_cold, cached=route.cached_tokens
            )
        if route.prompt.hashes:
            self.index.record(node.name, key, route.prompt.hashes, self.slots(node))
        if route.session:
            self.pin(route.session, node.name)
            self.recent_pins[route.session] = node.name  # for the cluster to share

    def pin(self, session: str, node: str) -> None:
        """Remember ``node`` as the last one that served ``session``."""
        self.sessions[session] = node
        self.sessions.move_to_end(session)
        if len(self.sessions) > _MAX_SESSIONS:
            self.sessions.popitem(last=False)

    def _dispatch(self, first: str | None = None) -> None:
        """Hand free slots to waiters, oldest first per model; ``first``'s model first.

        A waiter that waits for one node (its cache is there) lets the others pass while
        that node is full, until its patience runs out; then it takes any node.
        """
        keys = list(self._queue)
        if first in self._queue:
            keys.remove(first)
            keys.insert(0, first)
        now = asyncio.get_running_loop().time()
        for key in keys:
            queue = self._queue.get(key)
            if not queue:
                continue
            blocked = False  # no node has room for a waiter that takes any node
            for waiter in list(queue):
                if waiter.future.done():
                    queue.remove(waiter)
                    continue
                if waiter.prefer is not None and (
                    now >= waiter.prefer_until or not self._still_holds(waiter)
                ):
                    self._unprefer(waiter)
                if waiter.prefer is None and blocked:
                    continue
                try:
                    picked = self._pick(
                        waiter.request,
                        waiter.prompt,
                        waiter.exclude,
                        prefer=waiter.prefer,
                        may_wait=not waiter.preferred_once,
                    )
                except NoNode as exc:
                    if waiter.prefer is not None:  # its node is gone: take any
                        self._unprefer(waiter)
                        continue
                    queue.remove(waiter)
                    waiter.future.set_exception(exc)
                    continue
                if isinstance(picked, _Wait):
                    self._prefer(waiter, picked, now)
                    continue
                if picked is None:
                    blocked = blocked or waiter.prefer is None
                    continue
                queue.remove(waiter)
                if waiter.prefer is not None:  # waited for this node, for that reason
                    picked.reason = waiter.prefer_reason
                self._unprefer(waiter)
                waiter.future.set_result(picked)

    def describe(self, node: Node) -> dict[str, Any]:
        """Routing's view of ``node`` for ``/admin/nodes``."""
        return {
            "slots": self.slots(node),
            "slots_in_use": dict(sorted(node.busy.items())),
            "learned": self.rates.describe(node.name),
            "conversations": self.index.conversations(node.name),
            "peers_in_flight": dict(sorted(node.peer_busy.items())),
            "out_by_peer": node.peer_out_until > self.clock(),
        }
