"""Tests for plugins.balancers: exact pick sequences, so any drift in the algorithms fails."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from daemon import registry
from daemon.ports import Balancer
from plugins.balancers.least_busy import LeastBusyBalancer
from plugins.balancers.round_robin import RoundRobinBalancer
from plugins.balancers.weighted import WeightedBalancer


@dataclass
class Node:
    name: str
    weight: int = 1
    in_flight: int = 0


def picks(balancer: Balancer, candidates: list[Node], count: int) -> str:
    return "".join(balancer.choose(candidates).name for _ in range(count))


# -- registry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("round_robin", RoundRobinBalancer),
        ("weighted", WeightedBalancer),
        ("least_busy", LeastBusyBalancer),
    ],
)
def test_registry_names_resolve_to_no_argument_classes(name, cls):
    loaded = registry.load("balancers", name)
    assert loaded is cls
    node = Node("a")
    assert loaded().choose([node]) is node


# -- round robin ---------------------------------------------------------------------------


def test_round_robin_cycles_in_fleet_order():
    a, b, c = Node("a"), Node("b"), Node("c")
    assert picks(RoundRobinBalancer(), [a, b, c], 7) == "abcabca"


def test_round_robin_returns_the_candidate_object_itself():
    a, b = Node("a"), Node("b")
    balancer = RoundRobinBalancer()
    assert balancer.choose([a, b]) is a
    assert balancer.choose([a, b]) is b


def test_round_robin_subset_picks_the_least_recently_chosen():
    a, b, c = Node("a"), Node("b"), Node("c")
    balancer = RoundRobinBalancer()
    assert picks(balancer, [a, b, c], 4) == "abca"
    # b waited longer than c, so the subset [b, c] gets b, then the full set gets c.
    assert picks(balancer, [b, c], 1) == "b"
    assert picks(balancer, [a, b, c], 4) == "cabc"


def test_round_robin_new_node_goes_first_and_removed_nodes_are_ignored():
    a, b, c, d = Node("a"), Node("b"), Node("c"), Node("d")
    balancer = RoundRobinBalancer()
    assert picks(balancer, [a, b, c], 3) == "abc"
    assert picks(balancer, [a, c, d], 4) == "dacd"


def test_round_robin_spreads_evenly_over_many_picks():
    nodes = [Node(n) for n in "abcd"]
    assert Counter(picks(RoundRobinBalancer(), nodes, 400)) == dict.fromkeys("abcd", 100)


def test_round_robin_interleaved_models_load_every_node_equally():
    # One model on [a, b], another on [a, b, c], alternating. A node just used for one
    # model waits its turn for the other, so c (which only the second model can use)
    # gets 150 of 600, not the 100 that separate rotations per model would give it.
    a, b, c = Node("a"), Node("b"), Node("c")
    balancer = RoundRobinBalancer()
    first, second = [], []
    for _ in range(300):
        first.append(balancer.choose([a, b]).name)
        second.append(balancer.choose([a, b, c]).name)
    assert "".join(first[:8]) == "aabbaabb"
    assert "".join(second[:8]) == "bcacbcac"
    assert Counter(first + second) == {"a": 225, "b": 225, "c": 150}


# -- smooth weighted round-robin ------------------------------------------------------------


def test_weighted_nginx_example_5_1_1():
    nodes = [Node("a", 5), Node("b", 1), Node("c", 1)]
    balancer = WeightedBalancer()
    assert picks(balancer, nodes, 7) == "aabacaa"
    assert picks(balancer, nodes, 7) == "aabacaa"


def test_weighted_3_1_is_exactly_3_1_in_every_window_of_4():
    nodes = [Node("a", 3), Node("b", 1)]
    sequence = picks(WeightedBalancer(), nodes, 400)
    assert sequence[:8] == "aabaaaba"
    for start in range(len(sequence) - 3):
        assert Counter(sequence[start : start + 4]) == {"a": 3, "b": 1}, start
    assert Counter(sequence) == {"a": 300, "b": 100}


def test_weighted_equal_weights_alternate_first_in_order_on_ties():
    nodes = [Node("a", 2), Node("b", 2), Node("c", 2)]
    assert picks(WeightedBalancer(), nodes, 6) == "abcabc"


def test_weighted_node_lacking_the_model_gets_nothing_and_others_keep_ratio():
    # Acceptance: weights 3, 1, 1 with the third lacking the model: exactly 300:100:0.
    a, b, _c = Node("a", 3), Node("b", 1), Node("c", 1)
    assert Counter(picks(WeightedBalancer(), [a, b], 400)) == {"a": 300, "b": 100}


def test_weighted_interleaved_models_each_follow_the_weights_exactly():
    # Two models: one on [a, b], one on [a, b, c]; their requests alternate.
    a, b, c = Node("a", 3), Node("b", 1), Node("c", 1)
    balancer = WeightedBalancer()
    first, second = [], []
    for _ in range(400):
        first.append(balancer.choose([a, b]).name)
        second.append(balancer.choose([a, b, c]).name)
    assert "".join(first[:4]) == "aaba"
    assert "".join(second[:5]) == "abaca"
    assert Counter(first) == {"a": 300, "b": 100}
    assert Counter(second) == {"a": 240, "b": 80, "c": 80}


def test_weighted_node_cooling_down_and_coming_back():
    a, b, c = Node("a", 1), Node("b", 1), Node("c", 2)
    balancer = WeightedBalancer()
    assert picks(balancer, [a, b, c], 3) == "cab"
    # c cools down: [a, b] alternate from a fresh start.
    assert picks(balancer, [a, b], 3) == "aba"
    # c is back: the full set resumes where it stopped (its 4th pick was due to be c).
    assert picks(balancer, [a, b, c], 5) == "ccabc"
    assert Counter(picks(balancer, [a, b, c], 400)) == {"a": 100, "b": 100, "c": 200}


def test_weighted_unknown_and_many_candidate_sets_do_not_break_it():
    balancer = WeightedBalancer()
    for i in range(3000):
        nodes = [Node(f"n{i}", 1), Node(f"n{i + 1}", 2)]
        assert balancer.choose(nodes) is nodes[1]


def test_weighted_weight_change_takes_effect():
    a, b = Node("a", 1), Node("b", 1)
    balancer = WeightedBalancer()
    assert picks(balancer, [a, b], 4) == "abab"
    a.weight = 3
    assert Counter(picks(balancer, [a, b], 400)) == {"a": 300, "b": 100}


# -- least busy -----------------------------------------------------------------------------


def test_least_busy_picks_fewest_in_flight():
    nodes = [Node("a", in_flight=2), Node("b", in_flight=0), Node("c", in_flight=1)]
    assert LeastBusyBalancer().choose(nodes).name == "b"


def test_least_busy_is_relative_to_weight():
    # (in_flight + 1) / weight: a = 3/3 = 1.0, b = 2/1 = 2.0 -> a despite more in flight.
    a, b = Node("a", weight=3, in_flight=2), Node("b", weight=1, in_flight=1)
    assert LeastBusyBalancer().choose([a, b]) is a
    # a = 4/3 > b = 1/1 -> b.
    a.in_flight, b.in_flight = 3, 0
    assert LeastBusyBalancer().choose([a, b]) is b


def test_least_busy_idle_weighted_node_wins_over_idle_light_node():
    light, heavy = Node("light", weight=1), Node("heavy", weight=2)
    assert LeastBusyBalancer().choose([light, heavy]) is heavy


def test_least_busy_ties_rotate_so_idle_nodes_share_load():
    nodes = [Node("a"), Node("b"), Node("c")]
    assert picks(LeastBusyBalancer(), nodes, 6) == "abcabc"


def test_least_busy_exact_ratio_tie_rotates():
    # 2/2 == 1/1: a tie, broken round robin.
    a, b = Node("a", weight=2, in_flight=1), Node("b", weight=1, in_flight=0)
    assert picks(LeastBusyBalancer(), [a, b], 4) == "abab"


def test_least_busy_follows_in_flight_as_it_changes():
    nodes = {n: Node(n) for n in "abc"}
    balancer = LeastBusyBalancer()
    order = []
    for _ in range(6):
        chosen = balancer.choose(list(nodes.values()))
        chosen.in_flight += 1
        order.append(chosen.name)
    assert "".join(order) == "abcabc"
    assert [n.in_flight for n in nodes.values()] == [2, 2, 2]
    nodes["b"].in_flight = 0
    assert balancer.choose(list(nodes.values())).name == "b"
