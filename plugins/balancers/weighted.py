"""Smooth weighted round-robin, as nginx's ``ngx_http_upstream_get_peer``."""

from __future__ import annotations

from collections.abc import Sequence

from daemon.ports import NodeT

# Candidate sets remembered; past this the table starts again (fleets see a few dozen).
_MAX_SETS = 1024


class WeightedBalancer:
    """Share requests in proportion to weight, interleaved rather than in bursts.

    For every call, each candidate's ``current`` grows by its weight, the candidate with
    the largest ``current`` is chosen (ties: the first in fleet order) and its ``current``
    drops by the sum of the candidates' weights. Weights 3 and 1 give exactly 3:1 in
    every window of 4 consecutive picks; weights 5, 1, 1 give a a b a c a a.

    Each distinct candidate set (by node names, in order) keeps its own ``current``
    values, as each nginx upstream block does. The router passes one set per model, and
    a shared table would let one model's traffic skew another's: with sets [a, b] and
    [a, b, c] interleaved and weights 3, 1, 1, shared values send nearly all of the first
    model to a. Kept apart, every model's traffic follows the weights exactly. A set seen
    again (a node back from cooldown) resumes where it left off.
    """

    def __init__(self) -> None:
        self._current: dict[tuple[str, ...], list[int]] = {}

    def choose(self, candidates: Sequence[NodeT]) -> NodeT:
        key = tuple(node.name for node in candidates)
        current = self._current.get(key)
        if current is None:
            if len(self._current) >= _MAX_SETS:
                self._current.clear()
            current = self._current[key] = [0] * len(candidates)
        total = 0
        best = 0
        for i, node in enumerate(candidates):
            current[i] += node.weight
            total += node.weight
            # Strictly greater: on a tie the earlier candidate wins, as in nginx.
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return candidates[best]
