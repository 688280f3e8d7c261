"""Fewest requests in flight relative to weight."""

from __future__ import annotations

from collections.abc import Sequence

from daemon.ports import NodeT
from plugins.balancers.round_robin import RoundRobinBalancer


class LeastBusyBalancer:
    """Choose the candidate with the smallest ``(in_flight + 1) / weight``.

    The ``+ 1`` counts the request being placed, so an idle weight-2 node (1/2) wins over
    an idle weight-1 node (1/1), and a weight-2 node with one request in flight (2/2)
    ties with an idle weight-1 node. Ties, most often between idle nodes, go to the tied
    node chosen least recently, so light traffic is still spread instead of always
    hitting the first node in fleet order.
    """

    def __init__(self) -> None:
        self._tie_breaker = RoundRobinBalancer()

    def choose(self, candidates: Sequence[NodeT]) -> NodeT:
        tied = [candidates[0]]
        # Compare (a+1)/wa with (b+1)/wb by cross-multiplying: exact integer ties and no
        # division by a zero weight.
        best_load, best_weight = candidates[0].in_flight + 1, candidates[0].weight
        for node in candidates[1:]:
            load, weight = node.in_flight + 1, node.weight
            lhs, rhs = load * best_weight, best_load * weight
            if lhs < rhs:
                tied = [node]
                best_load, best_weight = load, weight
            elif lhs == rhs:
                tied.append(node)
        # Even a sole winner goes through the tie breaker: it must remember every pick to
        # know which tied node has waited longest.
        return self._tie_breaker.choose(tied)
