"""The prefix index: which conversation prefixes each node's slots probably hold.

Ollama keeps a KV cache per slot: a request whose prompt starts with what a slot last
held evaluates only the rest. When a request completes on a node, its prompt's chain
(see :mod:`daemon.gateway.routing.prompts`) is recorded for that node and model as one entry; an
entry that the new one extends is replaced by it (the slot moved on). Entries age out
least recently used beyond ``entries_per_slot`` per slot, and go when the model leaves
the node's memory or the node goes down. A lookup walks the request's chain from its end,
so it costs O(chain + nodes) whatever the number of entries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Key = tuple[str, str]  # (node, model)


@dataclass(slots=True)
class _Shelf:
    """One node's entries for one model, least recently used first."""

    capacity: int
    entries: OrderedDict[int, tuple[int, ...]] = field(default_factory=OrderedDict)


class PrefixIndex:
    def __init__(self, entries_per_slot: int = 4) -> None:
        self.entries_per_slot = entries_per_slot
        self._shelves: dict[Key, _Shelf] = {}
        # model → prefix hash → node → how many of the node's entries contain it
        self._owners: dict[str, dict[int, dict[str, int]]] = {}

    def record(self, node: str, model: str, chain: Sequence[int], slots: int) -> None:
        """``node`` served a prompt with ``chain`` for ``model``; its slots hold it now."""
        if not chain:
            return
        key = (node, model)
        shelf = self._shelves.get(key)
        capacity = max(1, slots * self.entries_per_slot)
        if shelf is None:
            shelf = self._shelves[key] = _Shelf(capacity)
        shelf.capacity = capacity
        last = chain[-1]
        if last in shelf.entries:
            shelf.entries.move_to_end(last)
            return
        owners = self._owners.setdefault(model, {})
        # Entries this one extends (a conversation's earlier turns) are superseded.
        for h in chain[:-1]:
            if h in shelf.entries:
                self._forget(owners, node, shelf.entries.pop(h))
        shelf.entries[last] = tuple(chain)
        for h in chain:
            held = owners.setdefault(h, {})
            held[node] = held.get(node, 0) + 1
        while len(shelf.entries) > shelf.capacity:
            _, old = shelf.entries.popitem(last=False)
            self._forget(owners, node, old)

    def cached(self, model: str, chain: Sequence[int], nodes: Iterable[str]) -> dict[str, int]:
        """For each of ``nodes`` whose entries share a prefix with ``chain``: the length
        of the longest shared prefix, in segments. Nodes sharing nothing are absent."""
        owners = self._owners.get(model)
        if not owners or not chain:
            return {}
        wanted = set(nodes)
        found: dict[str, int] = {}
        for i in range(len(chain) - 1, -1, -1):
            held = owners.get(chain[i])
            if held is None:
                continue
            for name in held:
                if name in wanted and name not in found:
                    found[name] = i + 1
            if len(found) == len(wanted):
                break
        return found

    def touch(self, node: str, model: str, chain: Sequence[int]) -> None:
        """Mark the entry ending the chain's matched prefix as just used (LRU)."""
        shelf = self._shelves.get((node, model))
        if shelf is None:
            return
        for h in reversed(chain):
            if h in shelf.entries:
                shelf.entries.move_to_end(h)
                return

    def drop(self, node: str, model: str | None = None) -> None:
        """Forget what ``node`` holds: for one model (unloaded), or all (node down)."""
        for key in [k for k in self._shelves if k[0] == node and model in (None, k[1])]:
            shelf = self._shelves.pop(key)
            owners = self._owners.get(key[1], {})
            for chain in shelf.entries.values():
                self._forget(owners, node, chain)

    def forget(self, node: str, model: str, last: int) -> None:
        """Drop the entry ending in ``last`` (an attempt that never reached the node)."""
        shelf = self._shelves.get((node, model))
        if shelf is not None and last in shelf.entries:
            self._forget(self._owners.get(model, {}), node, shelf.entries.pop(last))

    def held(self, node: str, model: str) -> int:
        """Entries held for ``node`` and ``model``."""
        shelf = self._shelves.get((node, model))
        return len(shelf.entries) if shelf is not None else 0

    def conversations(self, node: str) -> int:
        """Entries held for ``node``, all models: roughly the conversations it serves."""
        return sum(len(s.entries) for (n, _), s in self._shelves.items() if n == node)

    def _forget(self, owners: dict[int, dict[str, int]], node: str, chain: Sequence[int]) -> None:
        for h in chain:
            held = owners.get(h)
            if held is None:
                continue
            left = held.get(node, 0) - 1
            if left > 0:
                held[node] = left
            else:
                held.pop(node, None)
                if not held:
                    del owners[h]
