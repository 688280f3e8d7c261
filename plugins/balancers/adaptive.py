"""Adaptive routing: the node that gives the first token soonest, weights breaking ties.

For each candidate the estimate of the time to the first token is

    wait     = requests in flight there ÷ slots × the node's service time for the model
    load     = its cold load when the model is not in memory there (0 when it is)
    prefill  = (prompt tokens − tokens its slots probably hold) × its seconds per token

and the smallest wins. A conversation pinned by a session key stays on its node while
that node's estimate is within ``pin_tolerance`` of the best. Among equally good nodes a
request with a conversation goes by weighted rendezvous hashing of the conversation's
start, so every gateway (each with its own view) puts a new conversation on the same
node; a request without one goes by smooth weighted round-robin, so an idle uniform fleet
still splits by weight.
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


def estimate(request: RouteRequest, c: Candidate[NodeT]) -> float:
    wait = c.busy / c.slots * c.service_seconds
    uncached = max(0, request.prompt_tokens - c.cached_tokens)
    return wait + c.load_seconds + uncached * c.seconds_per_prompt_token


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
        for c, cost in zip(candidates, costs, strict=True):
            if c.pinned and cost <= best * self.pin_tolerance + TIE_SECONDS:
                return Choice(c.node, "affinity", cost)
        limit = best * (1 + TIE_SHARE) + TIE_SECONDS
        ties = [i for i, cost in enumerate(costs) if cost <= limit]
        if len(ties) == 1:
            i = ties[0]
            return Choice(candidates[i].node, _why(request, candidates, costs, i), costs[i])
        if request.conversation is not None:
            i = max(
                ties,
                key=lambda j: rendezvous_score(
                    request.conversation or 0, candidates[j].node.name, candidates[j].node.weight
                ),
            )
            reason = "affinity" if candidates[i].cached_tokens else "rendezvous"
            return Choice(candidates[i].node, reason, costs[i])
        node = self._weighted.choose([candidates[i].node for i in ties])
        i = next(j for j in ties if candidates[j].node is node)
        return Choice(node, "weighted", costs[i])


def _why(
    request: RouteRequest, candidates: Sequence[Candidate[NodeT]], costs: list[float], i: int
) -> str:
    """What made candidate ``i`` the clear winner: its cache, its loaded model, or its wait."""
    chosen = candidates[i]
    others = [c for j, c in enumerate(candidates) if j != i]
    if chosen.cached_tokens and all(c.cached_tokens < chosen.cached_tokens for c in others):
        return "affinity"
    if chosen.load_seconds == 0 and any(c.load_seconds > 0 for c in others):
        return "warm"
    return "least-wait"
