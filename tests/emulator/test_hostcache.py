"""llama-server's slot choice and host-RAM prompt cache, on their own."""

from __future__ import annotations

from dataclasses import dataclass, field

from daemon.emulator.hostcache import HostCache, choose_slot


@dataclass
class Slot:
    tokens: list[int] = field(default_factory=list)
    used: int = 0


def test_a_slot_is_chosen_by_the_share_of_the_prompt_it_holds() -> None:
    empty, old, similar = Slot([], 0), Slot([7, 7, 7], 1), Slot([1, 2, 3, 4], 2)
    # the most similar, above a tenth of the prompt; it keeps half or more: no save
    assert choose_slot([empty, old, similar], [1, 2, 3, 4, 5]) == (similar, False)
    # it would keep less than half of itself: taken, but its state is saved first
    assert choose_slot([empty, old, similar], [1, 9, 9]) == (similar, True)
    # a tenth or less of the prompt anywhere: the least recently used, saved first
    prompt = [1] + [9] * 10
    assert choose_slot([old, similar, empty], prompt) == (empty, True)
    assert choose_slot([old, similar], prompt) == (old, True)


def test_saving_skips_what_is_held_and_drops_what_is_contained() -> None:
    cache = HostCache(limit=100)
    held = Slot([1, 2, 3])
    assert cache.swap(held, [5]) == (3, 0)
    assert cache.swap(Slot([1, 2]), [5]) == (0, 0)  # a prefix of a saved state: skipped
    assert cache.swap(Slot([1, 2, 3, 4]), [5]) == (4, 0)  # contains (1, 2, 3): replaces it
    assert cache.entries == [(1, 2, 3, 4)]


def test_a_restore_takes_the_best_share_of_the_prompt_worth_restoring() -> None:
    cache = HostCache(limit=100)
    cache.entries = [(1, 2, 3, 4, 5, 6, 7, 8), (1, 2, 9, 9)]
    slot = Slot([1])  # already held as a prefix: not saved again
    # (1..8) shares 2 of its 8 tokens: too little of it kept to be worth restoring
    assert cache.swap(slot, [1, 2, 9, 9, 9]) == (0, 4)
    assert slot.tokens == [1, 2, 9, 9] and cache.entries == [(1, 2, 3, 4, 5, 6, 7, 8)]
    # nothing better than what the slot holds: it keeps it (and saves it)
    assert cache.swap(slot, [1, 2, 9, 9, 10]) == (4, 0)
    assert slot.tokens == [1, 2, 9, 9] and len(cache.entries) == 2
