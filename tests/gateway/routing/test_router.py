"""The router on a fleet without I/O: slots, the fleet-wide queue, learning, pins.

The health clock is a fake; the queue's own waiting runs on the event loop.
"""

from __future__ import annotations

import asyncio

import pytest

from daemon.domain import FailureKind
from daemon.gateway.fleet import Fleet
from daemon.gateway.routing.prompts import read_prompt
from daemon.gateway.routing.rates import Sample
from daemon.gateway.routing.router import NoNode, Route, Router
from daemon.ports import RouteRequest
from daemon.settings import NodeSettings, RoutingSettings

M = "llama3.1:8b"
KEY = "llama3.1:8b"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    *nodes: tuple[str, int], loaded: tuple[str, ...] = (), **routing: object
) -> tuple[Router, Fleet, Clock]:
    settings = RoutingSettings(**routing)  # type: ignore[arg-type]
    configs = [
        NodeSettings(name=name, host="127.0.0.1", port=11434 + i, parallel=slots)
        for i, (name, slots) in enumerate(nodes)
    ]
    fleet = Fleet(configs, settings)
    clock = Clock()
    for node in fleet:
        ps = [{"name": M}] if node.name in loaded else []
        fleet.probe_ok(node, clock.now, version="0.12", tags=[{"name": M}], ps=ps)
    return Router(fleet, settings, clock), fleet, clock


def req(session: str | None = None) -> RouteRequest:
    return RouteRequest(KEY, prompt_tokens=10, session=session)


async def test_a_node_gets_no_more_than_its_slots_and_the_rest_wait() -> None:
    router, fleet, _ = make(("a", 2), ("b", 1), strategy="weighted", queue_timeout=5)
    held = [await router.acquire(req()) for _ in range(3)]
    assert sorted(r.node.name for r in held) == ["a", "a", "b"]
    waiting = asyncio.create_task(router.acquire(req()))
    await asyncio.sleep(0.01)
    assert not waiting.done() and router.queued == 1
    b_route = next(r for r in held if r.node.name == "b")
    router.release(b_route)  # b frees first: the waiter goes to b, not to the busier a
    route = await asyncio.wait_for(waiting, 1)
    assert route.node.name == "b" and router.queued == 0
    assert max(n.busy.get(KEY, 0) for n in fleet) <= 2


async def test_the_queue_is_first_come_first_served() -> None:
    router, _, _ = make(("a", 1), strategy="weighted", queue_timeout=5)
    first = await router.acquire(req())
    order: list[int] = []

    async def wait(i: int) -> None:
        route = await router.acquire(req())
        order.append(i)
        await asyncio.sleep(0)
        router.release(route)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(wait(i)))
        await asyncio.sleep(0)  # arrive in order
    # A newcomer does not overtake the queue, even at the moment a slot frees.
    router.release(first)
    tasks.append(asyncio.create_task(wait(99)))
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order == [0, 1, 2, 3, 4, 99]


async def test_overcommit_allows_that_many_beyond_the_slots() -> None:
    router, _, _ = make(("a", 1), strategy="weighted", overcommit=2, queue_timeout=0.1)
    routes = [await router.acquire(req()) for _ in range(3)]
    assert {r.node.name for r in routes} == {"a"}
    with pytest.raises(NoNode, match="timed out") as caught:
        await router.acquire(req())
    assert caught.value.status == 503


async def test_a_full_queue_and_a_timeout_both_answer_503() -> None:
    router, _, _ = make(("a", 1), strategy="weighted", queue_limit=1, queue_timeout=0.2)
    await router.acquire(req())
    waiter = asyncio.create_task(router.acquire(req()))
    await asyncio.sleep(0.01)
    with pytest.raises(NoNode, match="at capacity") as full:
        await router.acquire(req())
    assert full.value.retry_after == 1
    with pytest.raises(NoNode, match="timed out"):
        await waiter
    assert router.queued == 0


async def test_a_waiter_that_leaves_gives_its_place_up() -> None:
    router, fleet, _ = make(("a", 1), strategy="weighted", queue_timeout=5)
    held = await router.acquire(req())
    waiter = asyncio.create_task(router.acquire(req()))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert router.queued == 0
    router.release(held)
    assert fleet.get("a").busy == {}  # nobody took the slot on the cancelled waiter's behalf


async def test_a_node_back_from_cooldown_serves_the_queue() -> None:
    router, fleet, _ = make(("a", 1), ("b", 1), strategy="weighted", queue_timeout=5)
    b = fleet.get("b")
    assert b is not None
    b.health.draining = True
    await router.acquire(req())
    waiter = asyncio.create_task(router.acquire(req()))
    await asyncio.sleep(0.01)
    b.health.draining = False  # no slot freed: the waiter finds b on its next look
    route = await asyncio.wait_for(waiter, 2)
    assert route.node is b


async def test_the_classic_strategies_ignore_what_is_loaded() -> None:
    router, _, _ = make(("a", 1), ("b", 1), loaded=("a",), strategy="weighted")
    names = []
    for _ in range(10):
        route = await router.acquire(req())
        names.append(route.node.name)
        router.release(route)
    assert names.count("b") == 5


async def test_adaptive_prefers_warm_then_learns_and_remembers_the_conversation() -> None:
    router, fleet, _ = make(("a", 1), ("b", 1), loaded=("b",), strategy="adaptive")
    body = {"model": M, "messages": [{"role": "user", "content": "x" * 8000}]}
    prompt = read_prompt("/api/chat", body, KEY)
    request = RouteRequest(KEY, prompt.total_tokens, prompt.conversation)
    first = await router.acquire(request, prompt)
    assert (first.node.name, first.reason) == ("b", "warm")
    router.complete(first, Sample(prompt_count=2000, prompt_ns=2_000_000_000, eval_count=5))
    router.release(first)
    # The model loads on a too (a probe says so): the conversation still goes where it is.
    a = fleet.get("a")
    assert a is not None
    fleet.probe_ok(a, 1000.0, version="0.12", tags=[{"name": M}], ps=[{"name": M}])
    body["messages"] += [
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and?"},
    ]
    prompt = read_prompt("/api/chat", body, KEY)
    second = await router.acquire(
        RouteRequest(KEY, prompt.total_tokens, prompt.conversation), prompt
    )
    assert (second.node.name, second.reason) == ("b", "affinity")
    assert second.cached_tokens >= 2000
    assert router.describe(second.node)["slots_in_use"] == {KEY: 1}
    router.release(second)
    assert router.describe(second.node)["conversations"] == 1


async def test_the_model_leaving_a_nodes_memory_forgets_its_conversations() -> None:
    router, fleet, _ = make(("a", 1), loaded=("a",), strategy="adaptive")
    prompt = read_prompt("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}, KEY)
    route = await router.acquire(RouteRequest(KEY, 1, prompt.conversation), prompt)
    router.complete(route, None)
    router.release(route)
    a = fleet.get("a")
    assert a is not None and router.index.conversations("a") == 1
    fleet.probe_ok(a, 1000.0, version="0.12", tags=[{"name": M}], ps=[])
    assert router.index.conversations("a") == 0


async def test_a_session_key_pins_the_node_that_served_it_last() -> None:
    router, _, _ = make(("a", 1), ("b", 1), loaded=("a", "b"), strategy="adaptive")
    first = await router.acquire(req("user-7"))
    router.complete(first, None)
    router.release(first)
    for _ in range(5):
        route = await router.acquire(req("user-7"))
        assert route.node is first.node and route.reason == "affinity"
        router.complete(route, None)
        router.release(route)


def test_release_is_idempotent() -> None:
    router, fleet, _ = make(("a", 1), strategy="weighted")
    node = fleet.get("a")
    assert node is not None
    node.in_flight, node.busy[KEY] = 1, 1
    route = Route(node, KEY, "weighted")
    router.release(route)
    router.release(route)
    assert node.in_flight == 0 and node.busy == {}


def test_panic_routing_is_told_per_model() -> None:
    settings = RoutingSettings()
    configs = [NodeSettings(name=n, host="127.0.0.1", port=11434 + i) for i, n in enumerate("abc")]
    fleet = Fleet(configs, settings)
    models = {"a": ["llama3.1:8b"], "b": ["llama3.1:8b"], "c": ["qwen3:8b"]}
    for node in fleet:
        tags = [{"name": m} for m in models[node.name]]
        fleet.probe_ok(node, 1000.0, version="0.12", tags=tags, ps=[])
    assert fleet.panic_by_model(1000.0) == {"llama3.1:8b": False, "qwen3:8b": False}
    for name in "ab":  # every holder of llama3.1 refused a connection: both cooling
        node = fleet.get(name)
        assert node is not None
        node.health.record_failure(1000.0, FailureKind.REFUSED)
    assert fleet.panic_by_model(1000.5) == {"llama3.1:8b": True, "qwen3:8b": False}


async def _conversation_on_a(router: Router) -> tuple[RouteRequest, object]:
    """Record a long conversation as served by a; return its follow-up request and prompt."""
    body = {"messages": [{"role": "user", "content": "y" * 8000}]}
    prompt = read_prompt("/api/chat", body, KEY)
    a = router.fleet.get("a")
    assert a is not None
    route = Route(a, KEY, "test", prompt=prompt)
    router.complete(route, None)
    body["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "?"}]
    follow = read_prompt("/api/chat", body, KEY)
    return RouteRequest(KEY, follow.total_tokens, follow.conversation), follow


async def test_a_follow_up_waits_for_the_busy_node_that_holds_it_and_lets_others_pass() -> None:
    router, _, _ = make(
        ("a", 1), ("b", 1), loaded=("a", "b"), strategy="adaptive", service_seconds=0.2
    )
    request, prompt = await _conversation_on_a(router)
    other = await router.acquire(RouteRequest(KEY, 5, conversation=1))  # rendezvous: a or b
    if other.node.name == "b":  # make a the busy one
        router.release(other)
        other = await router.acquire(RouteRequest(KEY, 5, conversation=1), exclude=("b",))
    follow_up = asyncio.create_task(router.acquire(request, prompt))
    await asyncio.sleep(0.05)
    assert not follow_up.done()  # b is free, but a holds 2 000 cached tokens
    passer = await asyncio.wait_for(router.acquire(RouteRequest(KEY, 5)), 1)
    assert passer.node.name == "b"  # a request without a cache does not wait behind it
    router.release(other)
    route = await asyncio.wait_for(follow_up, 1)
    assert (route.node.name, route.reason) == ("a", "affinity")


async def test_a_waiter_whose_patience_runs_out_takes_any_node() -> None:
    router, _, _ = make(
        ("a", 1),
        ("b", 1),
        loaded=("a", "b"),
        strategy="adaptive",
        service_seconds=0.01,
        prompt_tokens_per_second=20_000,  # the cache saves only 0.1 s: wait that long
    )
    request, prompt = await _conversation_on_a(router)
    held = await router.acquire(RouteRequest(KEY, 5), exclude=("b",))
    started = asyncio.get_running_loop().time()
    route = await asyncio.wait_for(router.acquire(request, prompt), 2)
    waited = asyncio.get_running_loop().time() - started
    assert route.node.name == "b" and 0.05 < waited < 1.0
    router.release(held)


async def test_a_retry_excluding_a_node_does_not_hold_up_the_others_behind_it() -> None:
    router, _, _ = make(("x", 1), ("y", 1), strategy="weighted", queue_timeout=5)
    on_y = await router.acquire(req(), exclude=("x",))
    retry = asyncio.create_task(router.acquire(req(), exclude=("x",)))  # only y will do
    await asyncio.sleep(0.01)
    other = await asyncio.wait_for(router.acquire(req()), 1)  # x is free: no waiting
    assert other.node.name == "x"
    router.release(on_y)
    assert (await asyncio.wait_for(retry, 1)).node.name == "y"


async def test_session_pins_are_kept_for_the_cluster_only_while_one_shares_them() -> None:
    router, _, _ = make(("a", 1), loaded=("a",), strategy="adaptive")
    for i in range(50):
        route = await router.acquire(req(f"user-{i}"))
        router.complete(route, None)
        router.release(route)
    assert router.recent_pins == {} and len(router.sessions) == 50


async def test_an_attempt_that_failed_leaves_no_trace_in_the_prefix_index() -> None:
    router, _, _ = make(("a", 1), loaded=("a",), strategy="adaptive")
    prompt = read_prompt("/api/chat", {"messages": [{"role": "user", "content": "q"}]}, KEY)
    route = await router.acquire(RouteRequest(KEY, 1, prompt.conversation), prompt)
    assert router.index.conversations("a") == 1  # counted as held from dispatch on
    router.abandon(route)
    router.release(route)
    assert router.index.conversations("a") == 0
