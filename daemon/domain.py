"""Pure types and policy: model names, node health and cooldown rules. No I/O.

Time is always passed in as ``now``, monotonic seconds as a float, so that the rules can
be tested with a fake clock and the fleet decides which clock to use.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

# --- model names -----------------------------------------------------------------------

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

# Ollama bounds the host part at 350 characters; bounding the whole name the same way
# keeps the work on hostile input small and refuses nothing a real registry serves.
MAX_NAME_LEN = 350

# Mirrors ollama/ollama types/model/name.go (isValidPart, isValidLen): a part starts
# with a letter, digit or '_' and continues with those and '-'; '.' is allowed except in
# the namespace; ':' only in the host (a port). ASCII only: these names become paths
# on the nodes and arguments of `ollama pull` over SSH.
_PARTS: dict[str, tuple[re.Pattern[str], int, str]] = {
    "host": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*"), 350, "letters, digits, '_-.:'"),
    "namespace": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*"), 80, "letters, digits, '_-'"),
    "model": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"), 80, "letters, digits, '_-.'"),
    "tag": (re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"), 80, "letters, digits, '_-.'"),
}
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_NORMAL_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _check_part(kind: str, part: str, name: str) -> None:
    pattern, max_len, allowed = _PARTS[kind]
    if not part:
        raise ValueError(f"invalid model name {name!r}: the {kind} part is empty")
    if len(part) > max_len:
        raise ValueError(
            f"invalid model name {name!r}: the {kind} part is longer than {max_len} characters"
        )
    if pattern.fullmatch(part) is None:
        raise ValueError(
            f"invalid model name {name!r}: the {kind} part {part!r} must start with a "
            f"letter, digit or '_' and contain only {allowed}"
        )


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A normalised Ollama model name: ``[host/][namespace/]model[:tag][@sha256:<hex>]``.

    Parts are lower-case (Ollama compares names case-insensitively) and defaults are
    filled in, so "llama3", "Llama3:latest" and "registry.ollama.ai/library/llama3"
    are equal and have the same ``name``. Build one with ``ModelRef.parse``.
    """

    host: str
    namespace: str
    model: str
    tag: str
    digest: str | None = None  # "sha256:<64 lower-case hex>"

    def __post_init__(self) -> None:
        shown = f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        for kind in ("host", "namespace", "model", "tag"):
            value = getattr(self, kind)
            _check_part(kind, value, shown)
            if value != value.lower():
                raise ValueError(f"invalid model name {shown!r}: the {kind} part is not lower-case")
        if self.digest is not None and _NORMAL_DIGEST.fullmatch(self.digest) is None:
            raise ValueError(
                f"invalid model name {shown!r}: digest must be 'sha256:<64 lower-case hex>'"
            )

    @classmethod
    def parse(cls, name: str) -> ModelRef:
        """Validate and normalise ``name``; raise ``ValueError`` naming the broken rule.

        Accepts what Ollama accepts (``types/model/name.go``): ``model``,
        ``namespace/model``, ``host/namespace/model``, each with an optional ``:tag``; an
        ``http://`` or ``https://`` scheme before a host is dropped. Also accepts a digest
        suffix ``@sha256:<64 hex>`` (or Ollama's older ``@sha256-<hex>``). Ollama's newer
        four-part names with a kind segment (``skill``, ``agent``, ``mcp``) are not models
        and are refused.
        """
        if not name:
            raise ValueError("invalid model name '': the name is empty")
        if len(name) > MAX_NAME_LEN:
            raise ValueError(
                f"invalid model name {name[:40]!r}...: longer than {MAX_NAME_LEN} characters"
            )
        rest, at, raw_digest = name.rpartition("@")
        if not at:
            rest, raw_digest = name, ""
        digest = None
        if at:
            match = _DIGEST.fullmatch(raw_digest)
            if match is None:
                raise ValueError(
                    f"invalid model name {name!r}: the digest after '@' must be sha256:<64 hex>"
                )
            digest = "sha256:" + match.group(1).lower()
        # '/' cannot appear in a tag, so a ':' after the last '/' starts the tag; an
        # earlier ':' belongs to the host's port.
        tag = DEFAULT_TAG
        if rest.rfind(":") > rest.rfind("/"):
            rest, _, tag = rest.rpartition(":")
            _check_part("tag", tag, name)
        scheme, sep, after = rest.partition("://")
        if sep:
            if scheme.lower() not in ("http", "https"):
                raise ValueError(f"invalid model name {name!r}: scheme must be http or https")
            rest = after
        parts = rest.split("/")
        if sep and len(parts) != 3:
            raise ValueError(f"invalid model name {name!r}: a scheme needs host/namespace/model")
        if len(parts) > 3:
            raise ValueError(
                f"invalid model name {name!r}: {len(parts)} parts, at most host/namespace/model"
            )
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
        if len(parts) == 3:
            host, namespace, model = parts
            _check_part("host", host, name)
            _check_part("namespace", namespace, name)
        elif len(parts) == 2:
            namespace, model = parts
            _check_part("namespace", namespace, name)
        else:
            model = parts[0]
        _check_part("model", model, name)
        return cls(host.lower(), namespace.lower(), model.lower(), tag.lower(), digest)

    @property
    def name(self) -> str:
        """The shortest spelling, as Ollama's ``/api/tags`` lists it: ``llama3:latest``,
        ``user/model:tag``, ``host/namespace/model:tag``. Use it as the model's key."""
        if self.host != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        """Every part spelled out: ``registry.ollama.ai/library/llama3:latest``."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def __str__(self) -> str:
        return self.name if self.digest is None else f"{self.name}@{self.digest}"


# --- node health -----------------------------------------------------------------------


class NodeState(enum.Enum):
    """Where a node stands, as the router and ``/admin/nodes`` see it."""

    HEALTHY = "healthy"
    COOLING = "cooling"  # ejected after real requests failed, until a deadline
    DOWN = "down"  # failed `fall` probes in a row; back after `rise` good ones
    DRAINING = "draining"  # taken out by an operator; in-flight requests finish

    @property
    def routable(self) -> bool:
        """Whether new requests may go to a node in this state (outside panic routing)."""
        return self is NodeState.HEALTHY


class FailureKind(enum.Enum):
    """What went wrong with a request to a node, as far as the node's health goes."""

    CONNECT = "connect"
    REFUSED = "refused"  # no connection at all: the node is not there; out at once
    TIMEOUT = "timeout"
    HTTP5XX = "http5xx"
    BUSY503 = "busy503"  # Ollama's "server busy": its queue is full, the node is fine


def classify_status(status: int) -> FailureKind | None:
    """The failure an HTTP status from a node counts as, or ``None`` if it is not one.

    4xx answers (400 bad request, 404 model not found, ...) are the request's problem or
    the model's absence, never the node's: they do not count towards ejection.
    """
    if status == 503:
        return FailureKind.BUSY503
    if 500 <= status <= 599:
        return FailureKind.HTTP5XX
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class CooldownPolicy:
    """How failures take nodes out of rotation and how they come back.

    Modelled on Envoy's outlier detection (consecutive_5xx, base and max ejection time,
    max_ejection_percent, panic routing) and nginx's max_fails, with HAProxy-style
    rise/fall counts for active probes.
    """

    base_seconds: float = 10.0  # first ejection; the n-th in a row lasts base × n
    max_seconds: float = 300.0  # cap on one ejection
    failures_to_eject: int = 3  # consecutive connect/timeout/5xx failures that eject
    busy_cooldown_seconds: float = 1.0  # after a 503 "server busy"; does not grow
    rise: int = 2  # consecutive good probes to bring a down node back
    fall: int = 3  # consecutive failed probes to mark a node down
    # At most this share of the non-draining nodes may be out of rotation, and at least
    # min_routable must stay in; otherwise route across all of them (panic routing).
    max_ejection_percent: int = 100
    min_routable: int = 1
    # As Envoy's successful_active_health_check_uneject_host: a good probe ends an
    # ejection early, so a node that restarted is back within one probe interval.
    probe_unejects: bool = True

    def __post_init__(self) -> None:
        checks = {
            "base_seconds": self.base_seconds > 0,
            "max_seconds": self.max_seconds >= self.base_seconds,
            "failures_to_eject": self.failures_to_eject >= 1,
            "busy_cooldown_seconds": self.busy_cooldown_seconds >= 0,
            "rise": self.rise >= 1,
            "fall": self.fall >= 1,
            "max_ejection_percent": 0 <= self.max_ejection_percent <= 100,
            "min_routable": self.min_routable >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"cooldown policy: invalid {key} = {getattr(self, key)!r}")

    def min_routable_for(self, total: int) -> int:
        """How many of ``total`` non-draining nodes must be routable to avoid panic."""
        by_percent = (total * (100 - self.max_ejection_percent) + 99) // 100
        return min(total, max(self.min_routable, by_percent))


@dataclass(slots=True, kw_only=True)
class NodeHealth:
    """One node's health record, owned and mutated by the fleet.

    Passive results (real requests) come in through ``record_success`` and
    ``record_failure``, active ones through ``record_probe``. The rules:

    - ``failures_to_eject`` consecutive failures eject the node for
      ``min(base × n, max)`` seconds, n being the number of ejections in a row;
      failures of requests that were already in flight when it was ejected do not count.
    - n decreases by one for every ``base_seconds`` the node then spends neither
      ejected nor down.
    - A refused connection (nothing listens) ejects at once, whatever the count.
    - A good probe ends an ejection caused by refused connections at once
      (``probe_unejects``), keeping n: the node restarted and listens again. An ejection
      caused by failed requests (5xx, timeouts, cut connections) is not ended by a probe,
      which a node answering 500 to every generation passes: it ends with its cooldown,
      and then the node is on trial (half-open): the next request's success puts it
      back, its failure ejects it again at once, for longer (base × n, capped).
    - A 503 "server busy" takes the node out for ``busy_cooldown_seconds`` without
      counting as a failure; probes do not end it (a busy node answers probes fine).
    - ``fall`` failed probes in a row mark it down, ``rise`` good ones bring it back.
    - ``draining`` (set by the operator) stops new requests whatever the health.

    Whether the fleet as a whole may lose this node is not decided here: see
    ``select_routable``.
    """

    policy: CooldownPolicy = field(default_factory=CooldownPolicy)
    draining: bool = False
    down: bool = False
    consecutive_failures: int = 0
    ejections: int = 0  # n: ejections in a row, decays while healthy
    total_ejections: int = 0  # ever, for a metrics counter
    ejected_until: float = -math.inf
    busy_until: float = -math.inf
    last_error: str | None = None
    probe_successes: int = 0  # consecutive, towards `rise`
    probe_failures: int = 0  # consecutive, towards `fall`
    # What caused the current (or last) ejection: "refused" (a good probe ends it) or
    # "requests" (its cooldown does, then a trial).
    ejected_by: str = ""
    trial: bool = False  # half-open: the next failure ejects at once
    # Start of the current healthy stretch that n decays over.
    _healthy_since: float = field(default=-math.inf, init=False, repr=False)

    def state(self, now: float) -> NodeState:
        if self.draining:
            return NodeState.DRAINING
        if self.down:
            return NodeState.DOWN
        if now < self.ejected_until or now < self.busy_until:
            return NodeState.COOLING
        return NodeState.HEALTHY

    def is_routable(self, now: float) -> bool:
        return self.state(now).routable

    def cooldown_remaining(self, now: float) -> float:
        """Seconds until the current cooldown (ejection or busy) ends; 0.0 if none."""
        return max(0.0, self.ejected_until - now, self.busy_until - now)

    @property
    def cooldown_until(self) -> float | None:
        """The latest cooldown deadline ever set (may be past), or ``None``."""
        deadline = max(self.ejected_until, self.busy_until)
        return None if deadline == -math.inf else deadline

    @property
    def in_transition(self) -> bool:
        """A rise or fall count has started: a prober may probe this node sooner."""
        return self.probe_successes > 0 if self.down else self.probe_failures > 0

    def record_success(self, now: float) -> None:
        self._decay(now)
        self.consecutive_failures = 0
        if now >= self.ejected_until:
            self.trial = False

    def record_failure(self, now: float, kind: FailureKind, detail: str | None = None) -> None:
        self._decay(now)
        self.last_error = kind.value if detail is None else f"{kind.value}: {detail}"
        if kind is FailureKind.BUSY503:
            self.busy_until = max(self.busy_until, now + self.policy.busy_cooldown_seconds)
            return
        if now < self.ejected_until:
            # A request sent before the ejection failing now says nothing new; counting
            # it would re-eject the node the moment it comes back.
            return
        self.consecutive_failures += 1
        if kind is FailureKind.REFUSED or self.trial:
            # Nothing listens (further requests would only be refused too; a good probe
            # brings the node back as soon as it listens again), or a trial failed.
            self.consecutive_failures = self.policy.failures_to_eject
        if self.consecutive_failures >= self.policy.failures_to_eject:
            self.consecutive_failures = 0
            self.ejections += 1
            self.total_ejections += 1
            duration = min(self.policy.base_seconds * self.ejections, self.policy.max_seconds)
            self.ejected_until = now + duration
            self.ejected_by = "refused" if kind is FailureKind.REFUSED else "requests"
            self.trial = kind is not FailureKind.REFUSED

    def record_probe(self, now: float, ok: bool, detail: str | None = None) -> None:
        self._decay(now)
        if not ok:
            self.probe_successes = 0
            self.probe_failures += 1
            self.last_error = "probe" if detail is None else f"probe: {detail}"
            if not self.down and self.probe_failures >= self.policy.fall:
                self.down = True
            return
        self.probe_failures = 0
        self.probe_successes += 1
        if self.down:
            if self.probe_successes < self.policy.rise:
                return
            self.down = False
            self._healthy_since = now
        if (
            self.policy.probe_unejects
            and now < self.ejected_until
            and self.ejected_by != "requests"
        ):
            self.ejected_until = now
            self._healthy_since = now
            self.consecutive_failures = 0

    def _decay(self, now: float) -> None:
        # Applied lazily before every change: count the whole base periods spent
        # routable and up since the last ejection ended (or the last decrement).
        if self.ejections == 0 or self.down or now < self.ejected_until:
            return
        start = max(self._healthy_since, self.ejected_until)
        periods = int((now - start) // self.policy.base_seconds)
        if periods > 0:
            steps = min(periods, self.ejections)
            self.ejections -= steps
            self._healthy_since = start + steps * self.policy.base_seconds


class HasHealth(Protocol):
    """Anything the fleet keeps per node that carries a ``NodeHealth``."""

    @property
    def health(self) -> NodeHealth: ...


H = TypeVar("H", bound=HasHealth)


@dataclass(frozen=True, slots=True)
class Selection(Generic[H]):
    """The nodes new requests may go to, in the order given, and whether that is panic
    routing (too few routable nodes, so every non-draining node is used)."""

    nodes: tuple[H, ...]
    panic: bool


def select_routable(nodes: Sequence[H], now: float, policy: CooldownPolicy) -> Selection[H]:
    """Apply "never eject every node" to ``nodes`` (the fleet, or one model's holders).

    Normally the routable nodes. When fewer than ``policy.min_routable_for`` of the
    non-draining nodes are routable (always the case for a single node that is cooling
    or down), every non-draining node is returned with ``panic=True``, as Envoy does: a
    request to a doubtful node beats a certain 503, and the proxy still fails over.
    Draining nodes are never returned; with none left the selection is empty.
    """
    eligible = [node for node in nodes if not node.health.draining]
    routable = tuple(node for node in eligible if node.health.is_routable(now))
    if len(routable) < policy.min_routable_for(len(eligible)):
        return Selection(tuple(eligible), panic=True)
    return Selection(routable, panic=False)
