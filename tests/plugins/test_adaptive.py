"""The adaptive balancer's cost model and tie-breaking, on plain candidates (no I/O)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from daemon.ports import Candidate, RouteRequest
from plugins.balancers.adaptive import AdaptiveBalancer, estimate, rendezvous_score


@dataclass(frozen=True)
class FakeNode:
    name: str
    weight: int = 1
    in_flight: int = 0


A, B, C = FakeNode("a", 2), FakeNode("b", 1), FakeNode("c", 1)


def cand(node: FakeNode, **kw) -> Candidate[FakeNode]:
    base: dict = {
        "node": node,
        "slots": 1,
        "busy": 0,
        "load_seconds": 0.0,
        "seconds_per_prompt_token": 0.001,
        "service_seconds": 2.0,
        "cached_tokens": 0,
        "pinned": False,
    }
    return Candidate(**(base | kw))


def test_the_estimate_adds_wait_load_and_uncached_prefill() -> None:
    request = RouteRequest("m", prompt_tokens=3000)
    c = cand(A, slots=4, busy=5, load_seconds=7.0, cached_tokens=1000)
    # 5 in flight on 4 slots: 2 ahead of it, ÷ 4 slots x 2 s; + 7 s load; + 2000 uncached
    # tokens x 1 ms
    assert estimate(request, c) == 1.0 + 7.0 + 2.0
    assert estimate(request, cand(A, slots=4, busy=3)) == 3.0  # a free slot: no wait


def test_an_idle_uniform_fleet_splits_by_weight() -> None:
    balancer = AdaptiveBalancer()
    picks = [
        balancer.select(RouteRequest("m", 10), [cand(A), cand(B)]).node.name for _ in range(30)
    ]
    assert Counter(picks) == {"a": 20, "b": 10}
    assert picks[:3] == ["a", "b", "a"]  # interleaved, as smooth WRR


def test_a_cached_prefix_beats_a_full_prefill() -> None:
    choice = AdaptiveBalancer().select(
        RouteRequest("m", 5000, conversation=7),
        [cand(A), cand(B, cached_tokens=4900, has_conversation=True)],
    )
    assert (choice.node, choice.reason) == (B, "affinity")
    assert round(choice.estimate, 3) == 0.1


def test_a_loaded_model_beats_a_cold_load() -> None:
    choice = AdaptiveBalancer().select(
        RouteRequest("m", 100), [cand(A, load_seconds=8.0), cand(B), cand(C, load_seconds=8.0)]
    )
    assert (choice.node, choice.reason) == (B, "warm")


def test_a_shorter_wait_wins_when_nothing_else_differs() -> None:
    choice = AdaptiveBalancer().select(
        RouteRequest("m", 100), [cand(A, busy=1, room=False), cand(B, slots=4, busy=3)]
    )
    assert (choice.node, choice.reason, choice.patience) == (B, "least-wait", 0.0)


def test_a_busy_node_holding_the_conversation_is_waited_for() -> None:
    # b holds 4 000 of 4 100 tokens but has no free slot: a slot frees in about 0.25 s,
    # while a's free slot would cost 4 s of prefill. Wait for b, at most the 3.9 s saved.
    request = RouteRequest("m", 4100, conversation=3)
    full_b = cand(B, slots=4, busy=4, room=False, service_seconds=1.0, cached_tokens=4000)
    choice = AdaptiveBalancer().select(request, [cand(A), full_b])
    assert (choice.node, choice.reason) == (B, "affinity")
    assert round(choice.patience, 3) == 4.0
    # Others waiting for b already make the wait longer than the prefill elsewhere.
    crowded = cand(B, slots=4, busy=4, room=False, waiting=20, service_seconds=1.0,
                   cached_tokens=4000)  # fmt: skip
    assert AdaptiveBalancer().select(request, [cand(A), crowded]).node is A


def test_uneven_load_places_a_new_conversation_on_the_least_busy_node() -> None:
    balancer = AdaptiveBalancer()
    for conversation in range(20):
        request = RouteRequest("m", 500, conversation=conversation)
        choice = balancer.select(request, [cand(A, slots=8, busy=6), cand(B, slots=8, busy=1)])
        assert (choice.node, choice.reason) == (B, "least-wait")


def test_a_long_prompt_prefers_the_warm_cache_over_an_idle_node() -> None:
    # b is busier but holds 20 000 of the 21 000 prompt tokens: 20 s of prefill saved.
    choice = AdaptiveBalancer().select(
        RouteRequest("m", 21_000, conversation=1),
        [cand(A, slots=2), cand(B, slots=2, busy=1, cached_tokens=20_000)],
    )
    assert choice.node is B


def test_a_pinned_session_stays_while_its_cost_is_within_the_tolerance() -> None:
    balancer = AdaptiveBalancer(pin_tolerance=1.5)
    request = RouteRequest("m", 1000, session="s1")
    near = [cand(A), cand(B, slots=2, busy=2, room=False, service_seconds=1.0, pinned=True)]
    # 1.0 s against 0.5 s of wait + 1.0 s: within 1.5 x
    assert balancer.select(request, near).node is B
    far = [cand(A), cand(B, load_seconds=10.0, pinned=True)]  # 1.0 s vs 11 s
    assert balancer.select(request, far).node is A


def test_equal_nodes_place_a_new_conversation_by_rendezvous_on_every_gateway() -> None:
    # Two gateways (two balancers, different histories) agree for every conversation.
    one, two = AdaptiveBalancer(), AdaptiveBalancer()
    two.select(RouteRequest("m", 10), [cand(A), cand(B)])  # some unrelated traffic first
    for conversation in range(200):
        request = RouteRequest("m", 500, conversation=conversation)
        first = one.select(request, [cand(A), cand(B), cand(C)])
        second = two.select(request, [cand(A), cand(B), cand(C)])
        assert first.node is second.node
        assert first.reason == "rendezvous"


def test_rendezvous_follows_the_weights_and_moves_only_a_leaving_nodes_share() -> None:
    nodes = [A, B, C]  # weights 2, 1, 1

    def winner(conv: int, among: list[FakeNode]) -> str:
        return max(among, key=lambda n: rendezvous_score(conv, n.name, n.weight)).name

    placed = {conv: winner(conv, nodes) for conv in range(4000)}
    shares = Counter(placed.values())
    assert 1800 < shares["a"] < 2200 and 800 < shares["b"] < 1200 and 800 < shares["c"] < 1200
    without_c = {conv: winner(conv, [A, B]) for conv in range(4000)}
    moved = [conv for conv in placed if placed[conv] != without_c[conv]]
    assert all(placed[conv] == "c" for conv in moved)


def test_near_equal_estimates_count_as_ties() -> None:
    # Learned prompt rates 3% apart must not split a conversation across gateways.
    request = RouteRequest("m", 2000, conversation=42)
    fast = [cand(A, seconds_per_prompt_token=0.00100), cand(B, seconds_per_prompt_token=0.00103)]
    slow = [cand(A, seconds_per_prompt_token=0.00103), cand(B, seconds_per_prompt_token=0.00100)]
    balancer = AdaptiveBalancer()
    assert balancer.select(request, fast).node is balancer.select(request, slow).node


def test_choose_without_facts_is_smooth_weighted_round_robin() -> None:
    balancer = AdaptiveBalancer()
    assert [balancer.choose([A, B]).name for _ in range(3)] == ["a", "b", "a"]


def test_candidates_are_not_changed() -> None:
    candidates = [cand(A), cand(B, cached_tokens=10)]
    before = [replace(c) for c in candidates]
    AdaptiveBalancer().select(RouteRequest("m", 100), candidates)
    assert candidates == before


def test_a_new_conversation_passes_over_a_node_whose_slots_are_all_taken() -> None:
    balancer = AdaptiveBalancer()
    full_a = cand(A, slots=2, held=2, capacity=2)
    for conversation in range(20):  # rendezvous alone would send some of them to a
        request = RouteRequest("m", 500, conversation=conversation)
        assert balancer.select(request, [full_a, cand(B, slots=2, held=1, capacity=2)]).node is B
    # With no room anywhere, rendezvous decides as before.
    both_full = [full_a, cand(B, slots=2, held=2, capacity=2)]
    placed = {balancer.select(RouteRequest("m", 500, conversation=c), both_full).node.name
              for c in range(20)}  # fmt: skip
    assert placed == {"a", "b"}


def test_a_shared_system_prompt_does_not_pull_a_new_conversation_onto_a_full_node() -> None:
    # a holds the system prompt (1 500 of 4 500 tokens) but its slots all hold other
    # conversations: taking one more would push one out, to be evaluated again later.
    request = RouteRequest("m", 4500, conversation=5)
    full_a = cand(A, slots=2, held=2, capacity=2, cached_tokens=1500)
    choice = AdaptiveBalancer().select(request, [full_a, cand(B, slots=2, held=1, capacity=2)])
    assert choice.node is B
    roomy_a = cand(A, slots=2, held=1, capacity=2, cached_tokens=1500)
    choice = AdaptiveBalancer().select(request, [roomy_a, cand(B, slots=2, held=1, capacity=2)])
    assert (choice.node, choice.reason) == (A, "affinity")


def test_a_full_node_with_no_alternative_is_not_waited_for_on_purpose() -> None:
    only = cand(A, slots=1, busy=1, room=False, cached_tokens=900, has_conversation=True)
    choice = AdaptiveBalancer().select(RouteRequest("m", 1000, conversation=1), [only])
    assert choice.node is A and choice.patience == 0.0  # any node that comes back will do
