"""The prefix index: what each node's slots probably hold, bounded and forgotten on unload."""

from __future__ import annotations

from daemon.gateway.routing.affinity import PrefixIndex

M = "llama3.1:8b:latest"


def test_the_longest_shared_prefix_is_found_per_node() -> None:
    index = PrefixIndex()
    index.record("a", M, [1, 2, 3], slots=1)
    index.record("b", M, [1, 9], slots=1)
    assert index.cached(M, [1, 2, 3, 4, 5], ["a", "b", "c"]) == {"a": 3, "b": 1}
    assert index.cached(M, [7, 8], ["a", "b"]) == {}
    assert index.cached("other:latest", [1, 2, 3], ["a"]) == {}


def test_a_conversations_next_turn_replaces_its_earlier_entry() -> None:
    index = PrefixIndex(entries_per_slot=1)
    index.record("a", M, [1, 2], slots=1)
    index.record("a", M, [1, 2, 3, 4], slots=1)  # turn 2 extends turn 1
    assert index.conversations("a") == 1
    assert index.cached(M, [1, 2, 3, 4, 5], ["a"]) == {"a": 4}


def test_entries_age_out_least_recently_used_per_slot() -> None:
    index = PrefixIndex(entries_per_slot=2)
    for conv in (10, 20, 30):  # one slot keeps two conversations
        index.record("a", M, [conv, conv + 1], slots=1)
    assert index.conversations("a") == 2
    assert index.cached(M, [10, 11], ["a"]) == {}
    index.touch("a", M, [20, 21])  # used again: 30 is now the oldest
    index.record("a", M, [40, 41], slots=1)
    assert index.cached(M, [20, 21], ["a"]) == {"a": 2}
    assert index.cached(M, [30, 31], ["a"]) == {}
    # More slots, more room.
    index.record("a", M, [50, 51], slots=4)
    assert index.conversations("a") == 3


def test_a_shared_system_prompt_counts_as_a_partial_match() -> None:
    index = PrefixIndex()
    index.record("a", M, [100, 1, 2], slots=2)  # system prompt 100, user one
    assert index.cached(M, [100, 5], ["a"]) == {"a": 1}


def test_unloading_a_model_or_losing_the_node_forgets_it() -> None:
    index = PrefixIndex()
    index.record("a", M, [1, 2], slots=1)
    index.record("a", "other:latest", [1, 2], slots=1)
    index.record("b", M, [1, 2], slots=1)
    index.drop("a", M)
    assert index.cached(M, [1, 2], ["a", "b"]) == {"b": 2}
    assert index.cached("other:latest", [1, 2], ["a"]) == {"a": 2}
    index.drop("a")
    assert index.conversations("a") == 0
    assert index.cached("other:latest", [1, 2], ["a"]) == {}


def test_shared_hashes_are_counted_so_one_eviction_keeps_the_others() -> None:
    index = PrefixIndex(entries_per_slot=2)
    index.record("a", M, [100, 1], slots=1)
    index.record("a", M, [100, 2], slots=1)
    index.record("a", M, [100, 3], slots=1)  # evicts [100, 1]; 100 is still held by two
    assert index.cached(M, [100, 1], ["a"]) == {"a": 1}
    assert index.cached(M, [100, 3], ["a"]) == {"a": 2}
