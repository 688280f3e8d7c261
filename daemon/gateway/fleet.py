"""The fleet: the one live table of nodes, their health, models and load.

The prober (active checks) and the proxy (passive results of real requests) report into
it; the router, the merged catalogue views, ``/admin/nodes`` and metrics read from it.
A reload swaps the table without touching in-flight requests, which keep their ``Node``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.domain import (
    CooldownPolicy,
    FailureKind,
    ModelRef,
    NodeHealth,
    NodeState,
    select_routable,
)
from daemon.logs import get_logger
from daemon.settings import NodeSettings, RoutingSettings

log = get_logger("olmd.fleet")


@functools.lru_cache(maxsize=4096)
def model_key(name: str) -> str:
    """The name every table is keyed by: normalised, ``:latest`` implied.

    Raises ValueError for a name Ollama would not accept. Cached: every request asks,
    and a fleet serves a handful of names (failures are not cached, and are cheap).
    """
    return ModelRef.parse(name).name


def policy_from(routing: RoutingSettings) -> CooldownPolicy:
    return CooldownPolicy(
        base_seconds=routing.cooldown,
        max_seconds=max(routing.cooldown_max, routing.cooldown),
        failures_to_eject=routing.failures_to_eject,
        busy_cooldown_seconds=routing.busy_cooldown,
        rise=routing.rise,
        fall=routing.fall,
        max_ejection_percent=routing.max_ejection_percent,
    )


@dataclass(eq=False)
class Node:
    """One Ollama node as olmd sees it. Satisfies ``daemon.ports.NodeView``."""

    config: NodeSettings
    health: NodeHealth
    in_flight: int = 0
    # olmd's requests in flight per model (model_key → count): the slots in use.
    busy: dict[str, int] = field(default_factory=dict)
    version: str | None = None
    # From the last good probe: /api/tags entries and /api/ps entries, keyed by model_key.
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    probed_at: float | None = None
    # Models a node answered 404 for since its last probe: skipped until the next one.
    missing: set[str] = field(default_factory=set)
    out_since: float | None = None  # when an ejection (logged) began; None when in rotation
    down_since: float | None = None
    good_probe_at: float | None = None
    # What the other gateways of a cluster report (daemon.gateway.shared): their requests
    # in flight here per model, and until when one of them has the node out of rotation.
    peer_busy: dict[str, int] = field(default_factory=dict)
    peer_out_until: float = 0.0
    peer_models_out: dict[str, float] = field(default_factory=dict)  # model → until
    # Outlier detection per model: a model answering 5xx here (too large for what is left
    # of the node's memory, say) is out on this node alone; the node serves the others.
    model_health: dict[str, NodeHealth] = field(default_factory=dict)
    last_death: float = -1.0  # when a request here last lost its connection mid-way
    # The runner options olmd last sent for a model loaded here (model → options): a
    # request asking for others makes Ollama reload it.
    runners: dict[str, dict[str, object]] = field(default_factory=dict)
    # Slots per model learned by trying one request more (daemon.gateway.routing.slots).
    learned_slots: dict[str, int] = field(default_factory=dict)
    probing: set[str] = field(default_factory=set)  # models with a probe in flight
    probe_after: dict[str, float] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)  # models whose slot mismatch was logged

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def weight(self) -> int:
        return self.config.weight

    @property
    def url(self) -> str:
        return self.config.url

    def holds(self, key: str) -> bool:
        return key in self.models and key not in self.missing

    def listed(self, key: str) -> str | None:
        """The model's name as this node spells it in ``/api/tags``, None if unlisted."""
        entry = self.models.get(key)
        name = None if entry is None else entry.get("name") or entry.get("model")
        return name if isinstance(name, str) else None

    def has_loaded(self, key: str) -> bool:
        return key in self.loaded

    def serves(self, key: str, now: float) -> bool:
        """Whether ``key`` is not ejected on this node, by this gateway or another (the
        node's own health aside)."""
        if self.peer_models_out.get(key, 0.0) > now:
            return False
        health = self.model_health.get(key)
        return health is None or health.is_routable(now)

    def state(self, now: float) -> NodeState:
        return self.health.state(now)

    def redact(self, text: str) -> str:
        return self.config.redact(text)


class Fleet:
    """The live node table. All methods run on the event loop; none awaits."""

    def __init__(self, nodes: list[NodeSettings], routing: RoutingSettings) -> None:
        self.policy = policy_from(routing)
        self._nodes: dict[str, Node] = {}
        # Told when what a node's memory holds is gone: (node, model), or (node, None)
        # for everything (the node was down). The router's prefix index listens.
        self.on_forget: Callable[[str, str | None], None] = lambda node, model: None
        self.update(nodes, routing)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, name: str) -> Node | None:
        return self._nodes.get(name)

    def panic_by_model(self, now: float) -> dict[str, bool]:
        """Per model: whether too few of its holders are routable, so that requests for it
        go to every holder that is not draining (``select_routable``)."""
        holders: dict[str, list[Node]] = {}
        for node in self._nodes.values():
            for key in node.models:
                holders.setdefault(key, []).append(node)
        return {
            key: select_routable(nodes, now, self.policy).panic
            for key, nodes in sorted(holders.items())
        }

    @property
    def panic(self) -> bool:
        """Whether any model is routed in panic now."""
        return any(self.panic_by_model(time.monotonic()).values())

    def answering(self) -> bool:
        """Whether any node not draining answered its last probe: olmd can route.

        Down and cooling nodes count (panic routing still sends them requests), and a node
        counts again from its first good probe, before ``rise`` makes it healthy."""
        return any(
            n.probed_at is not None and n.health.probe_failures == 0 and not n.health.draining
            for n in self._nodes.values()
        )

    def update(self, nodes: list[NodeSettings], routing: RoutingSettings) -> list[Node]:
        """Adopt a new node list (a reload). Returns the nodes that are new or re-addressed.

        A node whose name and address stay keeps its health, models and in-flight count;
        a changed weight takes effect on the next request.
        """
        self.policy = policy_from(routing)
        fresh: list[Node] = []
        table: dict[str, Node] = {}
        for config in nodes:
            old = self._nodes.get(config.name)
            if old is not None and old.url == config.url:
                old.config = config
                old.health.policy = self.policy
                table[config.name] = old
            else:
                node = Node(config=config, health=NodeHealth(policy=self.policy))
                table[config.name] = node
                fresh.append(node)
        self._nodes = table
        return fresh

    # --- reports -------------------------------------------------------------------------

    def probe_ok(
        self,
        node: Node,
        now: float,
        *,
        version: str | None,
        tags: Sequence[Mapping[str, Any]],
        ps: Sequence[Mapping[str, Any]],
    ) -> None:
        loaded = _by_key(ps)
        if node.health.down or (node.version is not None and version != node.version):
            self.on_forget(node.name, None)  # back from down, or restarted: caches are cold
        else:
            for key in node.loaded.keys() - loaded.keys():
                self.on_forget(node.name, key)
        for key in list(node.runners):
            entry = loaded.get(key)
            known = node.runners[key].get("num_ctx")
            if entry is None or (known is not None and entry.get("context_length") != known):
                del node.runners[key]  # unloaded, or reloaded by someone else
        was_down = node.health.down
        node.version = version
        node.models = _by_key(tags)
        node.loaded = loaded
        node.missing.clear()
        node.probed_at = now
        node.good_probe_at = now
        node.peer_out_until = 0.0  # our own good probe counts, whatever the others saw
        node.health.record_probe(now, True)
        if not node.health.down:
            node.down_since = None
        if was_down and not node.health.down:
            log.info("node_up", node=node.name, version=version, models=len(node.models))
        self._back_in_rotation(node, now)

    def mark_loaded(self, node: Node, key: str) -> None:
        """A request just ran ``key`` on ``node``: it is in memory there until a probe
        says otherwise."""
        if key not in node.loaded:
            node.loaded[key] = {"name": key}

    def probe_failed(self, node: Node, now: float, detail: str) -> None:
        was_down = node.health.down
        node.probed_at = now
        node.health.record_probe(now, False, node.redact(detail))
        if node.health.down and not was_down:
            node.down_since = now
            log.warning("node_down", node=node.name, error=node.redact(detail))

    def request_ok(self, node: Node, now: float, key: str | None = None) -> None:
        node.health.record_success(now)
        if node.out_since is not None:
            self._back_in_rotation(node, now)
        if key is not None and (model := node.model_health.get(key)) is not None:
            model.record_success(now)
            if not model.trial and now >= model.ejected_until:
                del node.model_health[key]
                if model.total_ejections:
                    log.info("model_ejection_ended", node=node.name, model=key)

    def request_failed(
        self, node: Node, now: float, kind: FailureKind, detail: str, key: str | None = None
    ) -> None:
        """A request failed on ``node``. A 5xx answer for a model (``key``) counts against
        that model on this node; everything else against the node."""
        if key is not None and kind is FailureKind.HTTP5XX:
            health = node.model_health.get(key)
            if health is None:
                health = node.model_health[key] = NodeHealth(policy=self.policy)
            before = health.total_ejections
            health.record_failure(now, kind, node.redact(detail))
            if health.total_ejections > before:
                log.warning(
                    "model_ejected",
                    node=node.name,
                    model=key,
                    seconds=round(health.cooldown_remaining(now), 1),
                    ejections_in_a_row=health.ejections,
                    error=health.last_error,
                )
            return
        health = node.health
        before = health.total_ejections
        health.record_failure(now, kind, node.redact(detail))
        if health.total_ejections > before:
            node.out_since = now
            log.warning(
                "node_ejected",
                node=node.name,
                seconds=round(health.cooldown_remaining(now), 1),
                ejections_in_a_row=health.ejections,
                error=health.last_error,
            )

    def _back_in_rotation(self, node: Node, now: float) -> None:
        if node.out_since is not None and node.health.is_routable(now):
            log.info("node_ejection_ended", node=node.name, after=round(now - node.out_since, 1))
            node.out_since = None

    def model_missing(self, node: Node, key: str) -> None:
        node.missing.add(key)

    def set_draining(self, name: str, draining: bool) -> Node | None:
        node = self._nodes.get(name)
        if node is not None:
            node.health.draining = draining
        return node

    # --- views ---------------------------------------------------------------------------

    def describe(self, node: Node, now: float) -> dict[str, Any]:
        """A node for ``/admin/nodes``: no secrets, JSON-ready."""
        health = node.health
        remaining = health.cooldown_remaining(now)
        return {
            "name": node.name,
            "url": node.config.shown_address,
            "weight": node.weight,
            "state": node.state(now).value,
            "version": node.version,
            "models": sorted(node.models),
            "loaded": sorted(node.loaded),
            "missing": sorted(node.missing),
            "in_flight": node.in_flight,
            "parallel": node.config.parallel,
            "consecutive_failures": health.consecutive_failures,
            "ejections": health.total_ejections,
            "cooldown_seconds": round(remaining, 3),
            "cooldown_until": _wall_clock(remaining) if remaining > 0 else None,
            "last_error": health.last_error,
            "models_out": {  # models ejected on this node alone
                key: {
                    "cooldown_seconds": round(h.cooldown_remaining(now), 3),
                    "error": h.last_error,
                }
                for key, h in sorted(node.model_health.items())
                if not h.is_routable(now)
            },
            "last_probe_age_seconds": None
            if node.probed_at is None
            else round(now - node.probed_at, 3),
        }


def _wall_clock(seconds_from_now: float) -> str:
    deadline = datetime.now(UTC) + timedelta(seconds=seconds_from_now)
    return deadline.isoformat(timespec="seconds")


def _by_key(entries: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        name = entry.get("name") or entry.get("model")
        if not isinstance(name, str):
            continue
        try:
            out[model_key(name)] = dict(entry)
        except ValueError:
            continue  # a name Ollama itself produced but we cannot route to: skip it
    return out
