"""The slot model on its own: leases, loads, waits, slot choice, eviction, expiry (fake clock)."""

from __future__ import annotations

import pytest

from daemon.emulator.config import Stats
from daemon.emulator.slots import Lease, Load, SlotTable, Wait


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def lease_of(got: Lease | Load | Wait) -> Lease:
    assert isinstance(got, Lease), got
    return got


def resident(table: SlotTable, name: str, prompt: list[int] | None = None) -> Lease:
    """Load ``name`` into ``table`` and return its first lease."""
    assert table.take(name, prompt) == Load(name)
    return table.loaded(name, prompt)


def test_a_load_then_a_warm_slot_that_caches_the_conversation(clock: Clock) -> None:
    table = SlotTable(num_parallel=1, clock=clock)
    assert table.take("m", [1, 2, 3]) == Load("m")
    assert table.take("m", [1, 2]) == Wait("loading")
    first = table.loaded("m", [1, 2, 3], keep_alive_ns=50)
    assert (first.cached, first.evaluated, first.generating) == (0, 3, True)
    assert table.expiries() == {"m": 1_050}  # shown while the first request runs
    assert table.take("m", [9]) == Wait("slot")
    table.finish(first, [1, 2, 3, 4], keep_alive_ns=100)

    second = lease_of(table.take("m", [1, 2, 3, 4, 5, 6]))
    assert (second.cached, second.evaluated) == (4, 2)
    table.finish(second, [1, 2, 3, 4, 5, 6, 7], keep_alive_ns=100)
    again = lease_of(table.take("m", [1, 2, 3]))  # all cached: one token is still evaluated
    assert (again.cached, again.evaluated) == (2, 1)
    table.finish(again)  # holds None: the cache stays as it was
    assert again.slot is not None and again.slot.tokens == [1, 2, 3, 4, 5, 6, 7]

    bare = lease_of(table.take("m", None))  # an embedding or a bare load takes no slot
    assert (bare.slot, bare.evaluated, bare.generating) == (None, 0, False)
    assert lease_of(table.take("m", [8])).slot is not None  # the slot is still free


def test_no_slot_model_admits_everything_and_caches_nothing(clock: Clock) -> None:
    table = SlotTable(num_parallel=0, clock=clock)
    leases = [resident(table, "m", [1, 2])] + [lease_of(table.take("m", [1, 2])) for _ in range(5)]
    assert all(x.slot is None and x.cached == 0 and x.evaluated == 2 for x in leases)
    assert table.resident("m") is not None and table.resident("m").running == 6  # type: ignore[union-attr]


def test_slot_choice_is_llama_servers(clock: Clock) -> None:
    table = SlotTable(num_parallel=2, clock=clock)
    x = resident(table, "m", [1, 2])
    table.finish(x, [1, 2, 3], 100)
    # A free slot whose cache covers more than a tenth of the prompt is taken, even with
    # an empty slot free; without a host cache nothing is saved.
    y = lease_of(table.take("m", [1, 5]))
    assert (y.slot, y.cached, y.saved, y.restored) == (x.slot, 1, 0, 0)
    table.finish(y, [1, 5, 6], 100)

    # a prompt sharing a tenth or less with every slot takes the least recently used one
    z = lease_of(table.take("m", [9, 8, 7, 6, 5, 4, 3, 2, 1, 1]))
    assert z.slot is not x.slot and z.cached == 0
    w = lease_of(table.take("m", [1, 5, 6, 7]))  # the other slot is free: its cache counts
    assert (w.slot, w.cached) == (x.slot, 3)
    assert table.take("m", [1]) == Wait("slot")


def test_the_host_cache_keeps_what_a_slot_gave_up(clock: Clock) -> None:
    table = SlotTable(num_parallel=1, cache_tokens=10, clock=clock)
    a = resident(table, "m", [1, 2, 3])
    table.finish(a, [1, 2, 3, 4], 100)
    b = lease_of(table.take("m", [7, 8, 9]))  # nothing shared: the slot's state is saved
    assert (b.cached, b.saved, b.restored) == (0, 4, 0)
    table.finish(b, [7, 8, 9, 10], 100)
    a2 = lease_of(table.take("m", [1, 2, 3, 4, 5]))  # saved b's, restored a's
    assert (a2.cached, a2.evaluated, a2.saved, a2.restored) == (4, 1, 4, 4)
    table.finish(a2, [1, 2, 3, 4, 5, 6], 100)
    model = table.resident("m")
    assert model is not None and model.cache is not None
    assert model.cache.entries == [(7, 8, 9, 10)]  # a restore moves the state out
    a3 = lease_of(table.take("m", [1, 2, 3, 4, 5, 6, 7]))  # its own slot: no copy
    assert (a3.cached, a3.saved, a3.restored) == (6, 0, 0)
    table.finish(a3, [1, 2, 3, 4, 5, 6, 7, 8], 100)

    # bounded in tokens, the oldest go first, the newest always stays
    c = lease_of(table.take("m", [20, 21]))
    assert (c.saved, model.cache.tokens) == (8, 8)  # 4 + 8 > 10: the oldest, (7..10), went
    assert model.cache.entries == [tuple(range(1, 9))]
    table.finish(c, list(range(20, 32)), 100)
    lease_of(table.take("m", [30]))
    assert model.cache.entries == [tuple(range(20, 32))]  # 12 > 10 tokens, kept alone

    table.configure(num_parallel=1, max_loaded=0, cache_tokens=0)
    assert model.cache is None  # turned off: dropped
    table.configure(num_parallel=0, max_loaded=0, cache_tokens=10)
    assert model.cache is None  # no slots, nothing to save
    table.configure(num_parallel=1, max_loaded=0, cache_tokens=10)
    assert model.cache is not None and model.cache.entries == []
    table.unload("m")
    assert resident(table, "m", [1, 2, 3]).cached == 0  # and it goes with the model


def test_embedding_models_get_one_slot(clock: Clock) -> None:
    table = SlotTable(num_parallel=4, single=lambda name: name == "e", clock=clock)
    first = resident(table, "e", [])
    assert (first.slot is not None, first.evaluated, first.generating) == (True, 0, False)
    assert table.take("e", []) == Wait("slot")
    assert len(resident(table, "m", [1]).model.slots) == 4
    table.configure(num_parallel=2, max_loaded=0)
    assert [len(m.slots) for m in (first.model, table.resident("m"))] == [1, 2]  # type: ignore[union-attr]


def test_one_slot_takes_the_shared_prefix_of_any_conversation(clock: Clock) -> None:
    table = SlotTable(num_parallel=1, clock=clock)
    x = resident(table, "m", [1, 2, 3])
    table.finish(x, [1, 2, 3, 4], 100)
    other = lease_of(table.take("m", [1, 2, 9]))
    assert (other.cached, other.evaluated) == (2, 1)


def test_max_loaded_evicts_the_least_recently_used_idle_model(clock: Clock) -> None:
    table = SlotTable(num_parallel=1, max_loaded=2, clock=clock)
    a = resident(table, "a", [1])
    b = resident(table, "b", [1])
    table.finish(b, [1], 100)
    table.finish(a, [1], 100)  # a was used last
    assert table.take("c", [1]) == Load("c", ("b",))
    assert table.take("d", [1]) == Load("d", ("a",))
    assert table.take("e", [1]) == Wait("room")  # c and d loading take both places
    table.abort_load("d")  # the loading request left: its place is free again
    assert table.take("e", [1]) == Load("e")
    c = table.loaded("c", [1])
    e = table.loaded("e", [1])
    assert table.take("a", [1]) == Wait("room")  # both run: nothing idle to evict
    table.finish(e, [1], 100)
    table.finish(c, [1], 100)
    assert table.take("a", [1]) == Load("a", ("e",))
    assert set(table.expiries()) == {"c"}  # a is loading, not resident yet


def test_keep_alive_expiry_unloads_idle_models_only(clock: Clock) -> None:
    table = SlotTable(num_parallel=1, clock=clock)
    lease = resident(table, "m", [1, 2])
    table.finish(lease, [1, 2, 3], keep_alive_ns=300)
    assert table.expiries() == {"m": 1_300}
    running = lease_of(table.take("m", [1, 2, 3, 4]))
    clock.now = 5_000
    assert table.expire() == [] and table.resident("m") is not None  # never while running
    table.finish(running, [1, 2, 3, 4, 5], keep_alive_ns=300)
    clock.now = 5_299
    assert table.resident("m") is not None
    clock.now = 5_300
    assert table.expiries() == {}
    fresh = resident(table, "m", [1, 2, 3, 4])
    assert fresh.cached == 0  # the cache went with the model


def test_limits_change_while_running(clock: Clock) -> None:
    table = SlotTable(num_parallel=2, clock=clock)
    busy = resident(table, "m", [1])
    free = lease_of(table.take("m", [2]))
    table.finish(free, [2, 3], 100)
    table.configure(num_parallel=1, max_loaded=0)
    model = table.resident("m")
    assert model is not None and model.slots == [busy.slot]  # the free slot went
    table.configure(num_parallel=3, max_loaded=0)
    assert len(model.slots) == 3
    table.configure(num_parallel=0, max_loaded=0)
    assert model.slots == [] and lease_of(table.take("m", [1])).slot is None
    table.finish(busy, [1, 2], 100)  # its slot is gone: nothing to give back to
    assert table.unload("m") and not table.unload("m")


def test_stats_reset_keeps_what_runs_now() -> None:
    stats = Stats(cold_loads=3, evictions=1, prompt_tokens_cached=40, prompt_tokens_evaluated=9)
    stats.slots_in_use = {"a": 1}
    stats.max_slots_in_use = {"a": 2, "b": 4}
    stats.reset()
    assert (stats.cold_loads, stats.evictions, stats.prompt_tokens_cached) == (0, 0, 0)
    assert stats.slots_in_use == {"a": 1} and stats.max_slots_in_use == {"a": 1}
