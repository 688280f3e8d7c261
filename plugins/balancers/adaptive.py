"""Adaptive routing: the node that gives the first token soonest, weights breaking ties.

For each candidate the estimate of the time to the first token is

    wait     = requests ahead of it ÷ slots × the node's service time for the model
               (0 while a slot is free; beyond, the requests in flight past the slots
               and those already waiting for the node, plus this one)
    load     = its cold load when the model is not in memory there (0 when it is)
    prefill  = (prompt tokens − tokens its slots probably hold) × its seconds per token
    eviction = for a conversation new to a node whose slots are all taken, the prefill the
               conversation it pushes out will pay again (taken to be this one's size)

and the smallest wins, full nodes included: a follow-up whose conversation is cached on a
busy node waits for a slot there rather than evaluate the whole history elsewhere, for as
long as that saves time (the choice's ``patience``). A conversation pinned by a session
key stays on its node while that node's estimate is within ``pin_tolerance`` of the best.
Among equally good nodes a request with a conversation goes by weighted rendezvous hashing
of the conversation's start, so every gateway (each with its own view) puts a new
conversation on the same node, unless the load among them is clearly uneven (then the
least busy); nodes whose slots hold as many conversations as they can are passed over
for a new one while another has room. A request without a conversation goes by smooth
weighted round-robin, so an idle uniform fleet still splits by weight.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from daemon.ports import Candidate, Choice, NodeT, RouteRequest
from plugins.balancers.weighted import WeightedBalancer

# Estimates within this share (plus an absolute margin, in seconds) of the best are ties:
# learned rates differ a little between nodes and gateways, and that must not decide.
TIE_SHARE = 0.1
TIE_SECONDS = 0.05
# Rendezvous gives way to the least busy node when the busiest tie has this many more
# requests in flight than the least busy (and half as many again): new conversations
# must not pile onto one node because their hashes happened to fall there.
UNEVEN_ABS = 2
UNEVEN_REL = 1.5


def own_cost(request: RouteRequest, c: Candidate[NodeT]) -> float:
    """Seconds to the first token once a slot is free there: load and uncached prefill,
    plus what a new conversation costs the one it pushes out of a full node's slots."""
    uncached = max(0, request.prompt_tokens - c.cached_tokens)
    cost = c.load_seconds + uncached * c.seconds_per_prompt_token
    if c.capacity and c.held >= c.capacity and not c.has_conversation:
        # That conversation will evaluate its history again; take it to be this size.
        cost += request.prompt_tokens * c.seconds_per_prompt_token
    return cost


def wait_seconds(c: Candidate[NodeT]) -> float:
    ahead = c.busy - c.slots + 1 + c.waiting
    return max(0, ahead) / c.slots * c.service_seconds


def estimate(request: RouteRequest, c: Candidate[NodeT]) -> float:
    return wait_seconds(c) + own_cost(request, c)


def rendezvous_score(conversation: int, name: str, weight: int) -> float:
    """Weighted highest-random-weight score: ``w / -ln(h)``, h uniform in (0, 1).

    The node with the largest score wins; node j wins with probability w_j / Σw, and a
    node that leaves moves only the conversations it had won.
    """
    digest = hashlib.blake2b(
        f"{conversation}:{name}".encode(), digest_size=8, person=b"olmd-hrw"
    ).digest()
    h = (int.from_bytes(digest, "big") >> 11 | 1) / 2.0**53  # 53 bits, never 0
    return weight / -math.log(h)


class AdaptiveBalancer:
    def __init__(self, pin_tolerance: float = 1.5) -> None:
        self.pin_tolerance = pin_tolerance
        self._weighted = WeightedBalancer()

    def choose(self, candidates: Sequence[NodeT]) -> NodeT:
        """Without routing facts (a caller that has none): smooth weighted round-robin."""
        return self._weighted.choose(candidates)

    def select(
        self, request: RouteRequest, candidates: Sequence[Candidate[NodeT]]
    ) -> Choice[NodeT]:
        costs = [estimate(request, c) for c in candidates]
        best = min(costs)
        for i, c in enumerate(candidates):
            if c.pinned and costs[i] <= best * self.pin_tolerance + TIE_SECONDS:
                return self._choice(request, candidates, i, "affinity", costs[i])
        limit = best * (1 + TIE_SHARE) + TIE_SECONDS
        ties = [i for i, cost in enumerate(costs) if cost <= limit]
        roomy = [i for i in ties if candidates[i].room]
        ties = roomy or ties  # a tie with a free slot beats a tie to wait for
        if len(ties) == 1:
            i = ties[0]
            return self._choice(request, candidates, i, _why(candidates, costs, i), costs[i])
        if request.conversation is not None:
            if not any(candidates[i].has_conversation for i in ties):
                # A new conversation (or one whose cache is gone): to a node whose slots
                # have room for one more, so that it does not push another one out.
                spare = [i for i in ties if _spare(candidates[i])]
                ties = spare or ties
            busy = [candidates[i].busy for i in ties]
            if max(busy) - min(busy) > UNEVEN_ABS and max(busy) > UNEVEN_REL * min(busy):
                i = min(ties, key=lambda j: candidates[j].busy / candidates[j].slots)
                return self._choice(request, candidates, i, "least-wait", costs[i])
            i = max(
                ties,
                key=lambda j: rendezvous_score(
                    request.conversation or 0, candidates[j].node.name, candidates[j].node.weight
                ),
            )
            held = candidates[i].cached_tokens
            more = all(held > candidates[j].cached_tokens for j in ties if j != i)
            reason = "affinity" if held and more else "rendezvous"
            return self._choice(request, candidates, i, reason, costs[i])
        node = self._weighted.choose([candidates[i].node for i in ties])
        i = next(j for j in ties if candidates[j].node is node)
        return self._choice(request, candidates, i, "weighted", costs[i])

    @staticmethod
    def _choice(
        request: RouteRequest,
        candidates: Sequence[Candidate[NodeT]],
        i: int,
        reason: str,
        cost: float,
    ) -> Choice[NodeT]:
        chosen = candidates[i]
        if chosen.room:
            return Choice(chosen.node, reason, cost)
        # Worth waiting for while the wait is shorter than what going elsewhere would cost
        # beyond this node's own (its cache, its loaded model).
        others = [own_cost(request, c) for j, c in enumerate(candidates) if j != i]
        if not others:  # nowhere else to go: it waits in the queue like any request
            return Choice(chosen.node, reason, cost)
        saving = min(others) - own_cost(request, chosen)
        return Choice(chosen.node, reason, cost, patience=max(0.0, saving))


def _spare(c: Candidate[NodeT]) -> bool:
    return c.capacity == 0 or c.held < c.capacity


def _why(candidates: Sequence[Candidate[NodeT]], costs: list[float], i: int) -> str:
    """What made candidate ``i`` beat the runner-up: its cache, its loaded model, or its
    shorter wait."""
    chosen = candidates[i]
    rest = [j for j in range(len(candidates)) if j != i]
    if not rest:
        return "least-wait" if chosen.load_seconds == 0 else "warm"
    runner = candidates[min(rest, key=lambda j: costs[j])]
    if chosen.cached_tokens > runner.cached_tokens:
        return "affinity"
    if chosen.load_seconds < runner.load_seconds:
        return "warm"
    return "least-wait"
