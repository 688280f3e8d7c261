"""llama-server's host-RAM prompt cache (``--cache-ram``) and its choice of a free slot.

Since 0.30 Ollama runs GGUF models in llama.cpp's ``llama-server``, started without
``--cache-ram``: its default, 8 GiB of host RAM per loaded model, holds the states of
slots that were taken over by another prompt, so a node remembers many conversations,
not one per slot. The emulator counts the cache in tokens (8 GiB at 128 KiB of f16 KV
cache per token, an 8B Llama's, is 65,536 tokens).

:func:`choose_slot` picks a free slot as llama-server does: the one whose cache covers
the largest share of the prompt, if that share is above :data:`SIMILARITY`, else the
least recently used; the slot's state goes to the host cache when the prompt would throw
away most of it (or the slot was taken by age). :class:`HostCache` then saves that state
and restores, in its place, a saved one sharing more of the prompt, if there is one.
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from daemon.emulator.tokens import common_prefix

SIMILARITY = 0.1  # llama-server's --slot-prompt-similarity default
KEEP_TO_SKIP_SAVE = 0.5  # a slot chosen by similarity keeping less of itself is saved first
KEEP_TO_RESTORE = 0.25  # a saved state keeping less of itself is not worth restoring


class SlotLike(Protocol):
    tokens: list[int]
    used: int


S = TypeVar("S", bound=SlotLike)


def choose_slot(free: Sequence[S], prompt: Sequence[int]) -> tuple[S, bool]:
    """The free slot a prompt takes, and whether its state should go to the host cache
    first (and a better one be looked for there). ``free`` is not empty."""
    best: S | None = None
    best_share = SIMILARITY
    if prompt:
        for slot in free:
            if not slot.tokens:
                continue
            share = common_prefix(slot.tokens, prompt) / len(prompt)
            if share > best_share:
                best, best_share = slot, share
    if best is not None:
        kept = common_prefix(best.tokens, prompt) / len(best.tokens)
        return best, kept < KEEP_TO_SKIP_SAVE
    return min(free, key=lambda s: s.used), bool(prompt)


class HostCache:
    """Saved slot states of one loaded model, oldest first, ``limit`` tokens in all
    (beyond it the oldest go, but the newest always stays, as llama-server keeps one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: list[tuple[int, ...]] = []

    @property
    def tokens(self) -> int:
        return sum(len(e) for e in self.entries)

    def swap(self, slot: SlotLike, prompt: Sequence[int]) -> tuple[int, int]:
        """Save ``slot``'s state, then restore into it the saved state that shares more
        of ``prompt`` than the slot does, if any. Returns (tokens saved, tokens restored):
        what was copied between the GPU and host RAM."""
        saved = self._save(slot.tokens)
        restored = self._take_better(slot.tokens, prompt)
        if restored is not None:
            slot.tokens = list(restored)
        self.trim()
        return saved, len(restored) if restored is not None else 0

    def trim(self) -> None:
        total = self.tokens
        while len(self.entries) > 1 and total > self.limit:
            total -= len(self.entries.pop(0))

    def _save(self, tokens: Sequence[int]) -> int:
        if not tokens or any(common_prefix(e, tokens) == len(tokens) for e in self.entries):
            return 0  # empty, or already held by a longer state
        # States the new one contains are obsolete.
        self.entries = [e for e in self.entries if common_prefix(e, tokens) < len(e)]
        self.entries.append(tuple(tokens))
        return len(tokens)

    def _take_better(self, held: Sequence[int], prompt: Sequence[int]) -> tuple[int, ...] | None:
        if not prompt:
            return None
        best, best_share = None, common_prefix(held, prompt) / len(prompt)
        for i, entry in enumerate(self.entries):
            shared = common_prefix(entry, prompt)
            if shared / len(entry) < KEEP_TO_RESTORE:
                continue
            if shared / len(prompt) > best_share:
                best, best_share = i, shared / len(prompt)
        # A restore moves the state into the slot: the cache no longer holds it.
        return self.entries.pop(best) if best is not None else None
