"""Round robin that stays fair when the candidate subset changes from call to call."""

from __future__ import annotations

from collections.abc import Sequence

from daemon.ports import NodeT

# Remembered names beyond this are pruned; only nodes removed from the fleet pile up.
_MAX_TRACKED = 4096


class RoundRobinBalancer:
    """Each request goes to the candidate that was chosen least recently.

    With a fixed candidate list this is plain round robin in fleet order (a, b, c, a, ...).
    Keeping "last chosen" per node name instead of a single index keeps it fair when the
    router passes a different subset for each model: a node busy serving one model is
    not chosen again for another while some other candidate has waited longer. A node
    never chosen before goes first; ties go to the first in fleet order.
    """

    def __init__(self) -> None:
        self._tick = 0
        self._last_chosen: dict[str, int] = {}

    def choose(self, candidates: Sequence[NodeT]) -> NodeT:
        last = self._last_chosen
        best = candidates[0]
        best_tick = last.get(best.name, -1)
        for node in candidates[1:]:
            tick = last.get(node.name, -1)
            if tick < best_tick:
                best, best_tick = node, tick
        self._tick += 1
        last[best.name] = self._tick
        if len(last) > _MAX_TRACKED:
            self._prune()
        return best

    def _prune(self) -> None:
        # Forget the least recently chosen half; at worst a forgotten node is chosen
        # once out of turn.
        keep = sorted(self._last_chosen.items(), key=lambda item: item[1])
        self._last_chosen = dict(keep[len(keep) // 2 :])
