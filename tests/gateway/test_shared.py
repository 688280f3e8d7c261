"""Other gateways' views applied to the fleet (no Redis: the records are given)."""

from __future__ import annotations

from daemon.cluster.client import Cluster
from daemon.cluster.peers import NodeReport, PeerRecord
from daemon.domain import FailureKind
from daemon.gateway.fleet import Fleet
from daemon.gateway.routing.router import Router
from daemon.gateway.shared import SharedFleet
from daemon.ports import RouteRequest
from daemon.settings import ClusterSettings, NodeSettings, RoutingSettings

M = "llama3.1:8b"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def setup() -> tuple[SharedFleet, Fleet, Router, Clock, Clock]:
    routing = RoutingSettings(strategy="weighted", parallel=1)
    configs = [NodeSettings(name=n, host="127.0.0.1", port=1 + i) for i, n in enumerate("ab")]
    fleet = Fleet(configs, routing)
    mono, wall = Clock(100.0), Clock(1_000_000.0)
    for node in fleet:
        fleet.probe_ok(node, mono.now, version="0.12", tags=[{"name": M}], ps=[])
    router = Router(fleet, routing, mono)
    cluster = Cluster(ClusterSettings(name="me", peer_timeout=2.0), "redis://127.0.0.1:1/0")
    return SharedFleet(fleet, router, cluster, clock=mono, wall=wall), fleet, router, mono, wall


def test_a_peers_ejection_takes_the_node_out_here_until_our_own_good_probe() -> None:
    shared, fleet, router, mono, wall = setup()
    mono.now += 5
    wall.now += 5
    out = NodeReport(out_until=wall.now + 10, out_since=wall.now - 0.2)
    shared.apply([PeerRecord("other", wall.now, {"a": out})])
    assert [n.name for n in router.candidates(M)] == ["b"]
    a = fleet.get("a")
    assert a is not None
    fleet.probe_ok(a, mono.now + 1, version="0.12", tags=[{"name": M}], ps=[])
    mono.now += 1
    wall.now += 1
    shared.apply([PeerRecord("other", wall.now, {"a": out})])  # the same report again
    assert [n.name for n in router.candidates(M)] == ["a", "b"]


def test_a_peers_down_node_is_out_while_it_says_so_and_the_last_node_is_kept() -> None:
    shared, _, router, mono, wall = setup()
    mono.now += 5
    wall.now += 5
    down = NodeReport(down=True, out_since=wall.now - 1)
    shared.apply([PeerRecord("other", wall.now, {"a": down, "b": down})])
    # Every holder out by peers: this gateway's own view decides, as without a cluster.
    assert [n.name for n in router.candidates(M)] == ["a", "b"]
    shared.apply([PeerRecord("other", wall.now, {"a": down})])
    assert [n.name for n in router.candidates(M)] == ["b"]
    shared.forget_peers()  # Redis gone: back to our own view
    assert [n.name for n in router.candidates(M)] == ["a", "b"]


async def test_peers_requests_count_against_the_slots_and_their_pins_join_ours() -> None:
    shared, fleet, router, _, wall = setup()
    busy = NodeReport(busy={M: 1})
    shared.apply([PeerRecord("other", wall.now, {"a": busy}, sessions={"s-1": "b"})])
    route = await router.acquire(RouteRequest(M))
    assert route.node.name == "b"  # a's only slot is taken by the other gateway
    assert router.sessions["s-1"] == "b"
    a = fleet.get("a")
    assert a is not None and a.peer_busy == {M: 1}


def test_own_record_says_what_this_gateway_saw() -> None:
    shared, fleet, router, mono, wall = setup()
    a = fleet.get("a")
    assert a is not None
    fleet.request_failed(a, mono.now, FailureKind.REFUSED, "refused")
    a.busy[M] = 1
    router.recent_pins["s-9"] = "b"
    record = shared.own_record()
    assert record.gateway == "me" and record.sessions == {"s-9": "b"}
    report = record.nodes["a"]
    assert report.out_until > wall.now and abs(report.out_since - wall.now) < 1e-6
    assert report.busy == {M: 1} and not report.down
    assert router.recent_pins == {}  # each pin is published once
    again = PeerRecord.loads(record.dumps())
    assert again == record
    assert PeerRecord.loads("not json") is None
