"""Tests for daemon.domain: model names and the cooldown rules, with a fake clock (``now``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from daemon.domain import (
    CooldownPolicy,
    FailureKind,
    ModelRef,
    NodeHealth,
    NodeState,
    Selection,
    classify_status,
    select_routable,
)

HEX = "0123456789abcdef" * 4

# -- ModelRef ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "llama3",
        "llama3:latest",
        "LLaMA3:Latest",
        "library/llama3",
        "registry.ollama.ai/library/llama3:latest",
        "https://registry.ollama.ai/library/llama3",
        "http://Registry.Ollama.AI/library/llama3:latest",
    ],
)
def test_model_ref_spellings_of_one_model_are_equal(spelling):
    ref = ModelRef.parse(spelling)
    assert ref == ModelRef.parse("llama3")
    assert ref.name == "llama3:latest"
    assert ref.full == "registry.ollama.ai/library/llama3:latest"
    assert str(ref) == "llama3:latest"
    assert ref.digest is None


@pytest.mark.parametrize(
    ("spelling", "name", "parts"),
    [
        ("qwen2.5:0.5B-Instruct-Q4_K_M", "qwen2.5:0.5b-instruct-q4_k_m",
         ("registry.ollama.ai", "library", "qwen2.5", "0.5b-instruct-q4_k_m")),
        ("User/My-Model:7b", "user/my-model:7b",
         ("registry.ollama.ai", "user", "my-model", "7b")),
        ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
         "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m",
         ("hf.co", "bartowski", "llama-3.2-1b-instruct-gguf", "q4_k_m")),
        ("localhost:5000/team/model", "localhost:5000/team/model:latest",
         ("localhost:5000", "team", "model", "latest")),
        ("_private:_tag", "_private:_tag", ("registry.ollama.ai", "library", "_private", "_tag")),
        ("a" * 80 + ":" + "b" * 80, "a" * 80 + ":" + "b" * 80,
         ("registry.ollama.ai", "library", "a" * 80, "b" * 80)),
    ],
)  # fmt: skip
def test_model_ref_normalises(spelling, name, parts):
    ref = ModelRef.parse(spelling)
    assert ref.name == name
    assert (ref.host, ref.namespace, ref.model, ref.tag) == parts


def test_model_ref_is_a_usable_key():
    keys = {ModelRef.parse(n) for n in ("llama3", "Llama3:latest", "llama3:8b", "x/llama3")}
    assert {k.name for k in keys} == {"llama3:latest", "llama3:8b", "x/llama3:latest"}


@pytest.mark.parametrize("separator", [":", "-"])
def test_model_ref_digest_is_normalised_and_kept_apart(separator):
    ref = ModelRef.parse(f"Llama3@sha256{separator}{HEX.upper()}")
    assert ref.digest == f"sha256:{HEX}"
    assert ref.name == "llama3:latest"
    assert str(ref) == f"llama3:latest@sha256:{HEX}"
    assert ref != ModelRef.parse("llama3")


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "the name is empty"),
        ("x; rm -rf /", "the namespace part 'x; rm -rf ' must start"),
        ("$(id)", "the model part '$(id)' must start with a letter"),
        ("`id`", "must start with a letter, digit or '_'"),
        ("-rf", "the model part '-rf' must start with a letter"),
        ("--help", "must start with a letter"),
        ("../etc", "the namespace part '..' must start"),
        ("../../etc/passwd", "4 parts, at most host/namespace/model"),
        ("../etc/passwd", "the host part '..' must start"),
        ("/etc/passwd", "the host part is empty"),
        (".hidden", "the model part '.hidden' must start"),
        ("llama 3", "contain only letters, digits, '_-.'"),
        ("llama3\n", "the model part 'llama3\\n'"),
        ("llama3:latest\r\n", "the tag part"),
        ("llama3\x00", "the model part"),
        ("llama3\t", "the model part"),
        (" llama3", "must start with a letter"),
        ("llamа3", "contain only"),  # Cyrillic 'а'
        ("ｌｌａｍａ3", "must start with a letter"),  # full-width letters
        ("llama3:", "the tag part is empty"),
        (":latest", "the model part is empty"),
        ("llama3/", "the model part is empty"),
        ("llama3:-x", "the tag part '-x' must start"),
        ("llama3:a/b", "the namespace part 'llama3:a' must start"),
        ("a:b:c", "the model part 'a:b'"),
        ("ns.x/model", "the namespace part 'ns.x'"),
        ("a/b/c/d", "4 parts, at most host/namespace/model"),
        ("host:99/ns/m:t:t", "the model part 'm:t'"),
        ("ftp://host/ns/model", "scheme must be http or https"),
        ("http://llama3", "a scheme needs host/namespace/model"),
        ("llama3@", "digest after '@' must be sha256:<64 hex>"),
        ("llama3@sha256:abc", "digest after '@'"),
        ("llama3@sha256:" + "g" * 64, "digest after '@'"),
        ("llama3@md5:" + "0" * 64, "digest after '@'"),
        ("llama3@sha256:" + HEX + "\n", "digest after '@'"),
        ("a@b@sha256:" + HEX, "the model part 'a@b'"),
        ("m" * 81, "the model part is longer than 80 characters"),
        ("llama3:" + "t" * 81, "the tag part is longer than 80 characters"),
        ("n" * 81 + "/m", "the namespace part is longer than 80"),
        ("h" * 300 + "/n/" + "m" * 60, "longer than 350 characters"),
        ("llama3|nc", "contain only"),
        ("llama3&&id", "contain only"),
        ("llama3>out", "contain only"),
        ("llama3'", "contain only"),
        ('llama3"', "contain only"),
        ("llama3\\x", "contain only"),
        ("llama3%2F..", "contain only"),
        ("~root", "must start with a letter"),
        ("*", "must start with a letter"),
    ],
)
def test_model_ref_rejects_hostile_and_malformed_names(name, rule):
    with pytest.raises(ValueError, match="invalid model name") as caught:
        ModelRef.parse(name)
    message = str(caught.value)
    assert rule in message
    if len(name) <= 350:
        assert repr(name) in message


def test_model_ref_cannot_be_built_invalid_directly():
    with pytest.raises(ValueError, match="the model part is not lower-case"):
        ModelRef("registry.ollama.ai", "library", "Llama3", "latest")
    with pytest.raises(ValueError, match="the model part '-x' must start"):
        ModelRef("registry.ollama.ai", "library", "-x", "latest")
    with pytest.raises(ValueError, match="digest must be"):
        ModelRef("registry.ollama.ai", "library", "x", "latest", "sha256:abc")


# -- status classification ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, None),
        (400, None),
        (401, None),
        (404, None),
        (413, None),
        (429, None),
        (499, None),
        (500, FailureKind.HTTP5XX),
        (502, FailureKind.HTTP5XX),
        (503, FailureKind.BUSY503),
        (504, FailureKind.HTTP5XX),
        (599, FailureKind.HTTP5XX),
    ],
)
def test_classify_status(status, kind):
    assert classify_status(status) is kind


# -- policy ---------------------------------------------------------------------------------


def test_policy_defaults():
    policy = CooldownPolicy()
    assert (policy.base_seconds, policy.max_seconds, policy.failures_to_eject) == (10.0, 300.0, 3)
    assert (policy.busy_cooldown_seconds, policy.rise, policy.fall) == (1.0, 2, 3)
    assert (policy.max_ejection_percent, policy.min_routable, policy.probe_unejects) == (
        100,
        1,
        True,
    )


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"base_seconds": 0}, "base_seconds"),
        ({"base_seconds": 10, "max_seconds": 5}, "max_seconds"),
        ({"failures_to_eject": 0}, "failures_to_eject"),
        ({"busy_cooldown_seconds": -1}, "busy_cooldown_seconds"),
        ({"rise": 0}, "rise"),
        ({"fall": 0}, "fall"),
        ({"max_ejection_percent": 101}, "max_ejection_percent"),
        ({"max_ejection_percent": -1}, "max_ejection_percent"),
        ({"min_routable": 0}, "min_routable"),
    ],
)
def test_policy_rejects_bad_settings_naming_the_key(settings, key):
    with pytest.raises(ValueError, match=f"invalid {key} = "):
        CooldownPolicy(**settings)


@pytest.mark.parametrize(
    ("total", "percent", "minimum", "expected"),
    [
        (0, 100, 1, 0),
        (1, 100, 1, 1),
        (5, 100, 1, 1),
        (5, 100, 2, 2),
        (3, 50, 1, 2),
        (4, 50, 1, 2),
        (10, 90, 1, 1),
        (10, 70, 1, 3),
        (10, 0, 1, 10),
        (2, 100, 3, 2),
    ],
)
def test_policy_min_routable_for(total, percent, minimum, expected):
    policy = CooldownPolicy(max_ejection_percent=percent, min_routable=minimum)
    assert policy.min_routable_for(total) == expected


# -- NodeHealth: passive failures and cooldown ---------------------------------------------

POLICY = CooldownPolicy(base_seconds=10, max_seconds=35, failures_to_eject=3, rise=2, fall=3)


def fail(
    health: NodeHealth, now: float, times: int = 1, kind: FailureKind = FailureKind.CONNECT
) -> None:
    for _ in range(times):
        health.record_failure(now, kind)


def test_new_node_is_healthy():
    health = NodeHealth(policy=POLICY)
    assert health.state(0.0) is NodeState.HEALTHY
    assert health.is_routable(0.0)
    assert health.cooldown_remaining(0.0) == 0.0
    assert health.cooldown_until is None


@pytest.mark.parametrize("kind", [FailureKind.CONNECT, FailureKind.TIMEOUT, FailureKind.HTTP5XX])
def test_consecutive_failures_eject_for_base(kind):
    health = NodeHealth(policy=POLICY)
    fail(health, 100.0, 2, kind)
    assert health.is_routable(100.0)
    assert health.consecutive_failures == 2
    health.record_failure(100.0, kind, "boom")
    assert health.state(100.0) is NodeState.COOLING
    assert health.cooldown_remaining(100.0) == 10.0
    assert health.cooldown_remaining(104.0) == 6.0
    assert health.cooldown_until == 110.0
    assert (health.ejections, health.total_ejections, health.consecutive_failures) == (1, 1, 0)
    assert health.last_error == f"{kind.value}: boom"
    assert not health.is_routable(109.999)
    assert health.is_routable(110.0)


def test_success_resets_the_consecutive_count():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 2)
    health.record_success(1.0)
    fail(health, 2.0, 2)
    assert health.is_routable(2.0)
    assert health.consecutive_failures == 2
    assert health.ejections == 0


def test_cooldown_grows_with_ejections_in_a_row_and_is_capped():
    health = NodeHealth(policy=POLICY)
    deadlines = []
    now = 0.0
    for _ in range(5):
        fail(health, now, 3)
        deadlines.append(health.ejected_until)
        now = health.ejected_until  # fails again the moment it is back
    # base × n: 10, 20, 30, then capped at 35.
    assert deadlines == [10.0, 30.0, 60.0, 95.0, 130.0]
    assert health.ejections == 5
    assert health.total_ejections == 5


def test_failures_of_requests_already_in_flight_do_not_extend_the_ejection():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 3)
    fail(health, 5.0, 10)
    assert health.ejected_until == 10.0
    assert (health.ejections, health.consecutive_failures) == (1, 0)
    assert health.is_routable(10.0)
    health.record_success(10.0)  # its trial passed
    fail(health, 10.0, 2)
    assert health.is_routable(10.0)
    assert health.consecutive_failures == 2


def test_after_an_ejection_by_requests_one_trial_decides():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 3, FailureKind.HTTP5XX)  # n=1, until 10
    health.record_probe(5.0, ok=True)  # /api/version answers fine: no say in this
    assert health.state(5.0) is NodeState.COOLING
    assert health.is_routable(10.0) and health.trial
    fail(health, 10.0, 1, FailureKind.HTTP5XX)  # the trial failed: out again, longer
    assert (health.ejections, health.ejected_until) == (2, 30.0)
    assert health.is_routable(30.0)
    health.record_success(30.0)  # the trial passed: back, and one failure is one again
    assert not health.trial
    fail(health, 31.0, 2, FailureKind.HTTP5XX)
    assert health.is_routable(31.0)


def test_ejection_count_decays_one_per_base_period_spent_healthy():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 3)  # n=1, until 10
    fail(health, 10.0, 3)  # n=2, until 30
    assert health.ejections == 2
    health.record_success(39.9)
    assert health.ejections == 2
    health.record_success(40.0)
    assert health.ejections == 1
    health.record_success(49.9)
    assert health.ejections == 1
    health.record_success(50.0)
    assert health.ejections == 0
    fail(health, 50.0, 3)
    assert health.cooldown_remaining(50.0) == 10.0


def test_decay_counts_whole_periods_at_once_and_stops_at_zero():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 3)
    fail(health, 10.0, 3)
    fail(health, 30.0, 3)  # n=3, until 60
    health.record_success(85.0)  # 2.5 periods healthy
    assert health.ejections == 1
    fail(health, 85.0, 3)  # n=2: 20 s
    assert health.ejected_until == 105.0
    health.record_success(1000.0)
    assert health.ejections == 0


def test_no_decay_while_ejected_or_down():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 3)
    fail(health, 10.0, 3)  # n=2, until 30
    health.record_success(29.0)
    assert health.ejections == 2
    for t in (30.0, 31.0, 32.0):
        health.record_probe(t, ok=False)
    assert health.down
    health.record_probe(100.0, ok=False)
    assert health.ejections == 2  # 30..32 is less than a period, and down time does not count
    health.record_probe(101.0, ok=True)
    health.record_probe(102.0, ok=True)  # up again at 102
    health.record_success(111.0)
    assert health.ejections == 2
    health.record_success(112.0)
    assert health.ejections == 1


def test_busy_503_is_short_does_not_grow_and_does_not_count_as_failure():
    policy = CooldownPolicy(base_seconds=10, busy_cooldown_seconds=2, failures_to_eject=3)
    health = NodeHealth(policy=policy)
    fail(health, 0.0, 2)
    health.record_failure(5.0, FailureKind.BUSY503)
    assert health.state(5.0) is NodeState.COOLING
    assert health.cooldown_remaining(5.0) == 2.0
    assert (health.ejections, health.consecutive_failures) == (0, 2)
    assert health.last_error == "busy503"
    # A probe answers fine while the queue is full: it does not end a busy cooldown.
    health.record_probe(6.0, ok=True)
    assert not health.is_routable(6.0)
    assert health.is_routable(7.0)
    for t in (7.0, 8.0, 9.0):
        health.record_failure(t, FailureKind.BUSY503)
    assert health.ejections == 0
    assert health.cooldown_remaining(9.0) == 2.0


# -- NodeHealth: probes ---------------------------------------------------------------------


def test_good_probe_brings_a_node_ejected_by_refusals_back_at_once_keeping_n():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 1, FailureKind.REFUSED)
    health.record_probe(1.0, ok=True)  # listening again
    assert health.is_routable(1.0)
    fail(health, 1.0, 2)
    health.record_probe(1.0, ok=True)  # not ejected: nothing to undo
    assert health.consecutive_failures == 2
    fail(health, 1.0, 1, FailureKind.REFUSED)  # n=2, until 21
    health.record_probe(12.0, ok=True)
    assert health.state(12.0) is NodeState.HEALTHY
    assert health.cooldown_remaining(12.0) == 0.0
    assert health.ejections == 2
    fail(health, 13.0, 1, FailureKind.REFUSED)  # n=3: 30 s
    assert health.ejected_until == 43.0


def test_probe_does_not_uneject_when_policy_says_so():
    policy = CooldownPolicy(base_seconds=10, probe_unejects=False)
    health = NodeHealth(policy=policy)
    fail(health, 0.0, 3)
    health.record_probe(2.0, ok=True)
    assert not health.is_routable(2.0)
    assert health.is_routable(10.0)


def in_transition(health: NodeHealth) -> bool:
    # A call, so that mypy does not narrow the property between two asserts.
    return health.in_transition


def test_fall_failed_probes_in_a_row_mark_down_no_flapping():
    health = NodeHealth(policy=POLICY)
    health.record_probe(0.0, ok=False)
    health.record_probe(1.0, ok=False)
    assert in_transition(health)
    health.record_probe(2.0, ok=True)  # the run is broken
    assert not in_transition(health)
    health.record_probe(3.0, ok=False)
    health.record_probe(4.0, ok=False, detail="connection refused")
    assert health.state(4.0) is NodeState.HEALTHY
    health.record_probe(5.0, ok=False)
    assert health.state(5.0) is NodeState.DOWN
    assert not health.is_routable(5.0)
    assert health.last_error == "probe"
    assert not in_transition(health)


def test_rise_good_probes_in_a_row_bring_a_down_node_back():
    health = NodeHealth(policy=POLICY)
    for t in range(3):
        health.record_probe(float(t), ok=False)
    assert health.down
    health.record_probe(10.0, ok=True)
    assert health.state(10.0) is NodeState.DOWN
    assert in_transition(health)
    health.record_probe(11.0, ok=False)  # the run is broken
    health.record_probe(12.0, ok=True)
    assert health.state(12.0) is NodeState.DOWN
    health.record_probe(13.0, ok=True)
    assert health.state(13.0) is NodeState.HEALTHY


def test_node_back_from_down_is_also_unejected():
    health = NodeHealth(policy=POLICY)
    fail(health, 0.0, 1, FailureKind.REFUSED)  # until 10
    for t in (1.0, 2.0, 3.0):
        health.record_probe(t, ok=False)
    health.record_probe(4.0, ok=True)
    assert health.state(4.0) is NodeState.DOWN
    health.record_probe(5.0, ok=True)
    assert health.state(5.0) is NodeState.HEALTHY


def test_draining_stops_routing_whatever_the_health():
    health = NodeHealth(policy=POLICY, draining=True)
    assert health.state(0.0) is NodeState.DRAINING
    assert not health.is_routable(0.0)
    health.draining = False
    assert health.is_routable(0.0)


@pytest.mark.parametrize(
    ("state", "routable"),
    [
        (NodeState.HEALTHY, True),
        (NodeState.COOLING, False),
        (NodeState.DOWN, False),
        (NodeState.DRAINING, False),
    ],
)
def test_node_state_routable(state, routable):
    assert state.routable is routable


# -- never eject every node -----------------------------------------------------------------


@dataclass
class FakeNode:
    name: str
    health: NodeHealth = field(default_factory=lambda: NodeHealth(policy=POLICY))


def fleet(*names: str) -> list[FakeNode]:
    return [FakeNode(n) for n in names]


def names(selection: Selection[FakeNode]) -> list[str]:
    return [node.name for node in selection.nodes]


def test_select_routable_leaves_out_ejected_nodes_in_order():
    nodes = fleet("a", "b", "c")
    fail(nodes[1].health, 0.0, 3)
    selection = select_routable(nodes, 1.0, POLICY)
    assert (names(selection), selection.panic) == (["a", "c"], False)
    selection = select_routable(nodes, 10.0, POLICY)
    assert (names(selection), selection.panic) == (["a", "b", "c"], False)


def test_select_routable_never_ejects_every_node():
    nodes = fleet("a", "b", "c")
    for node in nodes:
        fail(node.health, 0.0, 3)
    nodes[2].health.down = True
    selection = select_routable(nodes, 1.0, POLICY)
    assert (names(selection), selection.panic) == (["a", "b", "c"], True)


def test_panic_never_includes_draining_nodes():
    nodes = fleet("a", "b", "c")
    nodes[0].health.draining = True
    fail(nodes[1].health, 0.0, 3)
    fail(nodes[2].health, 0.0, 3)
    selection = select_routable(nodes, 1.0, POLICY)
    assert (names(selection), selection.panic) == (["b", "c"], True)


def test_all_draining_gives_nothing_without_panic():
    nodes = fleet("a", "b")
    for node in nodes:
        node.health.draining = True
    selection = select_routable(nodes, 0.0, POLICY)
    assert (selection.nodes, selection.panic) == ((), False)
    assert select_routable([], 0.0, POLICY).nodes == ()


def test_single_node_fleet_is_never_ejected():
    (only,) = nodes = fleet("only")
    assert select_routable(nodes, 0.0, POLICY).panic is False
    fail(only.health, 0.0, 3)
    for t in (1.0, 2.0, 3.0):
        only.health.record_probe(t, ok=False)
    assert only.health.state(3.0) is NodeState.DOWN
    selection = select_routable(nodes, 3.0, POLICY)
    assert selection.nodes == (only,)
    assert selection.panic is True


def test_max_ejection_percent_sets_the_panic_threshold():
    policy = CooldownPolicy(base_seconds=10, max_ejection_percent=50)
    nodes = fleet("a", "b", "c", "d")
    fail(nodes[0].health, 0.0, 3)
    fail(nodes[1].health, 0.0, 3)
    selection = select_routable(nodes, 1.0, policy)
    assert (names(selection), selection.panic) == (["c", "d"], False)
    fail(nodes[2].health, 0.0, 3)
    selection = select_routable(nodes, 1.0, policy)
    assert (names(selection), selection.panic) == (["a", "b", "c", "d"], True)


def test_min_routable():
    policy = CooldownPolicy(min_routable=2)
    nodes = fleet("a", "b", "c")
    fail(nodes[0].health, 0.0, 3)
    assert select_routable(nodes, 1.0, policy).panic is False
    fail(nodes[1].health, 0.0, 3)
    assert select_routable(nodes, 1.0, policy).panic is True


def test_minus_infinity_deadlines_work_with_any_clock_origin():
    health = NodeHealth(policy=POLICY)
    assert health.ejected_until == -math.inf
    assert health.is_routable(-1e9)


def test_a_refused_connection_ejects_at_once_and_a_good_probe_ends_it() -> None:
    health = NodeHealth(policy=CooldownPolicy(failures_to_eject=3, base_seconds=10.0))
    health.record_failure(0.0, FailureKind.REFUSED, "connect call failed")
    assert health.state(0.1) is NodeState.COOLING
    assert health.total_ejections == 1
    health.record_probe(1.0, True)
    assert health.state(1.0) is NodeState.HEALTHY
