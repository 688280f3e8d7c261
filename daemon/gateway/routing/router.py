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
service time (:mod:`daemon.gateway.routing.rates`), and the prompt tokens the node's slots
probably hold (:mod:`daemon.gateway.routing.affinity`). Completed requests teach both.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

from daemon import registry
from daemon.domain import select_routable
from daemon.gateway.fleet import Fleet, Node
from daemon.gateway.routing.affinity import PrefixIndex
from daemon.gateway.routing.prompts import EMPTY, Prompt
from daemon.gateway.routing.queue import FleetQueue
from daemon.gateway.routing.rates import Defaults, Rates, Sample
from daemon.gateway.routing.route import NoNode, Route, Wait
from daemon.gateway.routing.slots import Slots
from daemon.ports import Balancer, Candidate, CostBalancer, RouteRequest
from daemon.settings import RoutingSettings
from daemon.tenancy.fair import DEFAULT_SHARE, FairShares, Share

__all__ = ["NoNode", "Route", "Router", "Wait", "make_balancer"]

CLOUD_SUFFIX = "-cloud"  # Ollama's cloud models (gpt-oss:120b-cloud) run on ollama.com
_MAX_SESSIONS = 100_000


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
        self.table = Slots(routing, clock)
        self.interactive: dict[str, int] = {}  # model → interactive requests in flight
        self.recent_pins: dict[str, str] = {}  # pins since the cluster last published
        self.share_pins = False  # set while a cluster shares them
        self.fair = FairShares(routing.interactive_window, routing.interactive_reserve)
        self.queue = FleetQueue(self, routing, self.fair)
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
        self.queue.routing = routing
        self.table.configure(routing)
        self.fair.configure(routing.interactive_window, routing.interactive_reserve)
        self.queue.dispatch()  # more slots or new nodes may serve queued requests now

    def slots(self, node: Node, key: str | None = None) -> int:
        """Requests ``node`` runs at once for a model: configured, or learned."""
        return self.table.slots(node, key)

    def candidates(self, key: str, exclude: Collection[str] = ()) -> list[Node]:
        """Nodes that may serve ``key`` now, ignoring their slots.

        Raises NoNode (503) when nodes hold the model but all of them are draining.
        """
        now = self.clock()
        holders = [n for n in self.fleet if n.holds(key) and n.name not in exclude]
        # Nodes another gateway of the cluster took out are skipped too, unless that
        # leaves none (then select_routable's own rules decide, as without a cluster).
        if any(n.peer_out_until > now for n in holders):  # only with a cluster
            ours = [n for n in holders if n.peer_out_until <= now]
            holders = ours or holders
        selection = select_routable(holders, now, self.fleet.policy)
        if holders and not selection.nodes:
            # Not a 404: Ollama clients take that as "pull the model".
            raise NoNode(503, f"every node holding {key!r} is draining", retry_after=5)
        nodes = list(selection.nodes)
        if any(n.model_health or n.peer_models_out for n in nodes):  # a model out somewhere
            serving = [n for n in nodes if n.serves(key, now)]
            nodes = serving or nodes  # none left: try them all, as panic routing does
        return nodes

    def room_on(self, name: str, key: str) -> bool | None:
        node = self.fleet.get(name)
        if node is None or not node.holds(key) or node.health.draining:
            return None
        now = self.clock()
        if not node.health.is_routable(now) or node.peer_out_until > now:
            return None
        if not node.serves(key, now):
            return None
        return self._has_room(node, key)

    def _has_room(self, node: Node, key: str) -> bool:
        cap = self.routing.max_in_flight_per_node
        if cap and node.in_flight >= cap:
            return False
        in_flight = node.busy.get(key, 0) + node.peer_busy.get(key, 0)
        limit = self.slots(node, key) + self.routing.overcommit
        if in_flight < limit:
            return True
        # One more while requests wait in olmd, to learn whether the node runs it at once.
        return (
            in_flight == limit and self.queue.has_waiters(key) and self.table.may_probe(node, key)
        )

    def pick(
        self,
        request: RouteRequest,
        prompt: Prompt,
        exclude: Collection[str],
        *,
        prefer: str | None = None,
        may_wait: bool = True,
        share: Share = DEFAULT_SHARE,
    ) -> Route | Wait | None:
        """A route on a node with a free slot; a _Wait when the cost balancer would rather
        wait for a busy node (only with ``may_wait``); None when no node has room (or
        only the headroom kept for interactive requests, for a batch one).
        ``prefer`` restricts the choice to that node."""
        key = request.model
        nodes = self.candidates(key, exclude)
        if not nodes:
            raise NoNode(404, f"model {key!r} not found on any available node")
        if key.endswith(CLOUD_SUFFIX):
            # Runs on ollama.com: no local slot, no cache, nothing to learn.
            node = self.balancer.choose(nodes)
            node.in_flight += 1
            return Route(node, key, "cloud", counted=False, started=self.clock())
        embedding = self.table.embedding
        if request.embedding:
            if key not in embedding and len(embedding) < 10_000:
                embedding.add(key)
        elif key in embedding:  # it generates too: not an embedding-only model
            embedding.discard(key)
        if share.batch and self._in_headroom(share, key, nodes):
            return None
        if prefer is not None:
            nodes = [n for n in nodes if n.name == prefer]
        free = [n for n in nodes if self._has_room(n, key)]
        balancer = self.balancer
        if isinstance(balancer, CostBalancer) and (free or (may_wait and nodes)):
            candidates = self._candidates(request, prompt, nodes if may_wait else free)
            choice = balancer.select(request, candidates)
            chosen = next(c for c in candidates if c.node is choice.node)
            if not chosen.room:
                return Wait(chosen.node, choice.patience, choice.reason)
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
        route.ahead = node.busy.get(key, 0)
        if (
            route.ahead + node.peer_busy.get(key, 0)
            >= self.slots(node, key) + self.routing.overcommit
        ):
            route.probe = True
            node.probing.add(key)
        node.in_flight += 1
        node.busy[key] = node.busy.get(key, 0) + 1
        route.started = self.clock()
        if share.batch:
            route.interactive = False
        else:
            self.interactive[key] = self.interactive.get(key, 0) + 1
        if request.runner or key in node.runners:
            node.runners[key] = dict(request.runner)  # loaded (or reloaded) with these
        return route

    def _in_headroom(self, share: Share, key: str, nodes: list[Node]) -> bool:
        """Whether the model's free slots are all kept for interactive requests now. An
        interactive request running takes its place in the headroom (the reserve is one
        slot's worth of batch throughput, not more), and the headroom never takes every
        slot: batch keeps at least one."""
        reserve = self.fair.reserve_for(share, key, self.clock()) - self.interactive.get(key, 0)
        if reserve <= 0:
            return False
        extra = self.routing.overcommit
        total = sum(self.slots(n, key) + extra for n in nodes)
        spare = sum(
            max(0, self.slots(n, key) + extra - n.busy.get(key, 0) - n.peer_busy.get(key, 0))
            for n in nodes
        )
        return spare <= min(reserve, total - 1)

    def prefill_seconds(self, request: RouteRequest, prompt: Prompt) -> float:
        """Seconds the uncached part of ``prompt`` takes to evaluate on the holder that
        has most of it: what a waiter's turn in the queue is ordered by."""
        key = request.model
        holders = [n for n in self.fleet if n.holds(key)]
        if not holders or not prompt.hashes:
            return 0.0
        matched = self.index.cached(key, prompt.hashes, (n.name for n in holders))
        best = max(matched.values(), default=0)
        cached = prompt.tokens[best - 1] if best else 0
        rate = min(self.rates.seconds_per_prompt_token(n.name, key) for n in holders)
        return max(0, prompt.total_tokens - cached) * rate

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
                    slots=self.slots(n, key),
                    busy=n.busy.get(key, 0) + n.peer_busy.get(key, 0),
                    load_seconds=self._load_seconds(n, request),
                    seconds_per_prompt_token=rates.seconds_per_prompt_token(n.name, key),
                    service_seconds=rates.service_seconds(n.name, key),
                    cached_tokens=prompt.tokens[segments - 1] if segments else 0,
                    has_conversation=bool(own) and segments >= own,
                    pinned=n.name == pinned,
                    room=self._has_room(n, key),
                    waiting=self.queue.waiting_for.get(n.name, 0),
                    held=self.index.held(n.name, key),
                    capacity=self.slots(n, key) * self.index.entries_per_slot,
                )
            )
        return out

    def _load_seconds(self, node: Node, request: RouteRequest) -> float:
        """What loading costs before ``request`` runs on ``node``: nothing when the model
        is loaded with the runner options it asks for; a (re)load otherwise, after the
        requests running on the old runner finish."""
        key = request.model
        if not node.has_loaded(key):
            return self._load_cost(node, key)
        if not self._reloads(node, request):
            return 0.0
        drain = self.rates.service_seconds(node.name, key) if node.busy.get(key) else 0.0
        return self.rates.load_seconds(node.name, key) + drain

    @staticmethod
    def _reloads(node: Node, request: RouteRequest) -> bool:
        """Whether Ollama would reload ``request.model`` on ``node`` for this request."""
        wanted = dict(request.runner)
        known = node.runners.get(request.model)
        if known is not None:
            return known != wanted
        # Loaded by requests olmd did not send (or before it started): /api/ps says the
        # context length; other options are unknown and taken to match.
        context = (node.loaded.get(request.model) or {}).get("context_length")
        asked = wanted.get("num_ctx")
        return asked is not None and context is not None and asked != context

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
        self,
        request: RouteRequest,
        prompt: Prompt = EMPTY,
        exclude: Collection[str] = (),
        share: Share = DEFAULT_SHARE,
    ) -> Route:
        """A node for one attempt, its slot taken; give it back with :meth:`release`."""
        wait: Wait | None = None
        self.fair.saw(share, request.model, self.clock())
        if not self.queue.has_waiters(request.model):  # nobody is waiting: no turn to take
            picked = self.pick(request, prompt, exclude, share=share)
            if isinstance(picked, Route):
                self.fair.served(share)
                return picked
            wait = picked
        else:
            self.candidates(request.model, exclude)  # a 503 for a draining fleet, at once
        return await self.queue.wait(request, prompt, exclude, wait, share)

    @property
    def queued(self) -> int:
        return self.queue.queued

    def release(self, route: Route) -> None:
        if route.released:
            return
        route.released = True
        node, key = route.node, route.key
        node.in_flight -= 1
        if route.probe:
            node.probing.discard(key)  # unanswered (failed, client gone): no lesson
        if not route.counted:
            return
        if route.interactive:
            left = self.interactive.get(key, 0) - 1
            if left > 0:
                self.interactive[key] = left
            else:
                self.interactive.pop(key, None)
        left = node.busy.get(key, 0) - 1
        if left > 0:
            node.busy[key] = left
        else:
            node.busy.pop(key, None)
        if self.queue.queued:
            self.queue.dispatch(key)

    def complete(self, route: Route, sample: Sample | None) -> None:
        """An attempt answered in full: learn from it, remember where its prompt now is."""
        if not route.counted:
            return  # a cloud model's: nothing of it is on the node
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
                node.name,
                key,
                held,
                expected_cold=route.expected_cold,
                cached=route.cached_tokens,
                prompt_tokens=route.prompt.total_tokens,
                conversation=route.prompt.conversation,
            )
            self.table.finished(node, key, held, probe=route.probe, ahead=route.ahead)
        if route.prompt.hashes:
            self.index.record(node.name, key, route.prompt.hashes, self.slots(node))
        if route.session:
            self.pin(route.session, node.name)
            if self.share_pins:  # the cluster publishes them, then clears the table
                self.recent_pins[route.session] = node.name

    def abandon(self, route: Route) -> None:
        """An attempt failed before its node evaluated anything: its prompt is not there."""
        if route.prompt.hashes:
            self.index.forget(route.node.name, route.key, route.prompt.hashes[-1])

    def forget_node(self, name: str) -> None:
        """What was learned about a node that left the fleet or changed address."""
        self.index.drop(name)
        self.rates.forget(name)

    def pin(self, session: str, node: str) -> None:
        """Remember ``node`` as the last one that served ``session``."""
        self.sessions[session] = node
        self.sessions.move_to_end(session)
        if len(self.sessions) > _MAX_SESSIONS:
            self.sessions.popitem(last=False)

    def describe(self, node: Node) -> dict[str, Any]:
        """Routing's view of ``node`` for ``/admin/nodes``."""
        return {
            # What olmd runs there at once: configured, or the most learned for a model.
            "slots": max([self.slots(node), *node.learned_slots.values()]),
            "slots_configured": self.table.configured(node) is not None,
            "slots_learned": dict(sorted(node.learned_slots.items())),
            "slots_in_use": dict(sorted(node.busy.items())),
            "learned": self.rates.describe(node.name),
            "conversations": self.index.conversations(node.name),
            "peers_in_flight": dict(sorted(node.peer_busy.items())),
            "out_by_peer": node.peer_out_until > self.clock(),
        }
