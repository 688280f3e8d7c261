"""The plugin API: one ``typing.Protocol`` per plugin kind.

The core talks to plugins only through these protocols, and plugins see the core only
through them and through ``daemon.domain``. A plugin class is registered by name
(``daemon.registry``: built-ins from a table, third parties from the entry point group
``olmd.<kind>``) and constructed by the core with no arguments.

Plugin kinds: ``Balancer`` (below), or its cost-aware form ``CostBalancer``, which also
sees the request's routing facts and what the fleet knows of each candidate;
``PullTransport`` (model downloads onto a node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable


class NodeView(Protocol):
    """What a balancer may know about a node: read-only, and nothing else.

    The fleet's own node objects satisfy this protocol; balancers must not mutate them or
    rely on any other attribute.
    """

    @property
    def name(self) -> str:
        """The node's unique name in the fleet; stable across reloads. Key state by it."""
        ...

    @property
    def weight(self) -> int:
        """The configured weight, at least 1. A weight-3 node should get 3 times the share
        of a weight-1 node."""
        ...

    @property
    def in_flight(self) -> int:
        """Requests olmd has sent to this node that have not finished yet (>= 0)."""
        ...


NodeT = TypeVar("NodeT", bound=NodeView)


class Balancer(Protocol):
    """Chooses one node among candidates for one request.

    Contract:

    - The class is constructed with no arguments, once per routing table (again after a
      reload), and ``choose`` is called on the event loop for every request. It must be
      fast and must not block or do I/O.
    - ``candidates`` is never empty. It is in the fleet's configured order and already
      filtered by the router: only nodes the fleet calls routable (healthy, not cooling,
      not down, not draining; or every non-draining node when the fleet is in panic
      routing) and that hold the requested model. Health is not the balancer's business.
    - The subset differs from request to request (per model, and as nodes cool down and
      come back), and nodes may be added or removed between calls. A balancer may keep
      state keyed by ``NodeView.name``; it must cope with names it has not seen and with
      remembered names that are absent.
    - ``choose`` returns one of the candidate objects itself (not a copy, not a node from
      an earlier call); the generic signature lets the router get its own node type back.
    """

    def choose(self, candidates: Sequence[NodeT]) -> NodeT:
        """Return the candidate that should serve the next request."""
        ...


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing knows of one request, read from its body once.

    ``prompt_tokens`` is an estimate (about four characters a token). ``conversation`` is a
    stable number for the conversation's start (its first messages), the same on every
    gateway, or None when the request has none. ``session`` is an explicit key the client
    gave (``X-Olmd-Session``, or OpenAI's ``user``), or None.
    """

    model: str
    prompt_tokens: int = 0
    conversation: int | None = None
    session: str | None = None
    # The options that decide how Ollama loads the model (num_ctx, num_batch, num_gpu,
    # main_gpu, num_thread, use_mmap), as sorted (name, value) pairs; () for the defaults.
    # A loaded runner with other values is reloaded for this request.
    runner: tuple[tuple[str, object], ...] = ()
    embedding: bool = False  # an embedding request: Ollama runs those one at a time


@dataclass(frozen=True, slots=True)
class Candidate(Generic[NodeT]):
    """One routable node that holds the model, with what the fleet knows of it.

    Every time is in seconds and already resolved: measured on this node for this model
    where the fleet has seen it, else the fleet's mean for the model, else the settings'
    default. ``load_seconds`` is 0 when the model is loaded there; it includes the cost of
    the eviction the load would cause on a node at its resident-model limit. A node with
    no ``room`` can be chosen too: the request then waits in olmd for a slot on it (for at
    most the choice's ``patience``), as when its cache is worth more than a free slot
    elsewhere.
    """

    node: NodeT
    slots: int  # requests the node runs at once for this model
    busy: int  # olmd's requests in flight on the node for this model
    load_seconds: float
    seconds_per_prompt_token: float
    service_seconds: float  # how long one request holds a slot
    cached_tokens: int  # prompt tokens the node's slots probably hold already
    pinned: bool  # the request's session was served here last
    room: bool = True  # a request sent now starts without waiting in olmd
    waiting: int = 0  # requests already waiting in olmd for a slot on this node
    # The node's slots probably hold this very conversation (its cached prefix reaches
    # past the conversation's first message, not just a system prompt others share).
    has_conversation: bool = False
    held: int = 0  # conversations routing believes the node's slots hold for the model
    capacity: int = 0  # how many it can hold (0: unknown)


@dataclass(frozen=True, slots=True)
class Choice(Generic[NodeT]):
    """A cost-aware balancer's answer: the node, why (``X-Olmd-Route``), its estimate."""

    node: NodeT
    reason: str
    estimate: float  # seconds to the first token, as the balancer reckoned it
    # For a node without room: how long the request may wait for a slot on it before it
    # takes whichever node frees one first.
    patience: float = 0.0


@runtime_checkable
class CostBalancer(Protocol):
    """A balancer that weighs each candidate's cost for this request (``adaptive``).

    Same contract as :class:`Balancer`, except that ``select`` receives the request's
    facts and one :class:`Candidate` per routable node holding the model, with or without
    a free slot (``room``), and returns a :class:`Choice` naming one of the candidates'
    nodes. Choosing a node without room makes the request wait for a slot there for at
    most ``Choice.patience`` seconds (0: it then takes whichever node frees one first).
    It must stay O(candidates).
    """

    def select(
        self, request: RouteRequest, candidates: Sequence[Candidate[NodeT]]
    ) -> Choice[NodeT]:
        """Return the choice for this request."""
        ...


# --- model downloads (the sync issue) ---------------------------------------------------


class PullTarget(Protocol):
    """Where a transport pulls a model to: one node, as the sync engine describes it.

    Read-only. Every field is already resolved from settings and secrets (per-node values
    first, then global ones), so a transport reads no configuration of its own.
    """

    @property
    def name(self) -> str:
        """The node's name in settings; for messages only."""
        ...

    @property
    def url(self) -> str:
        """The node's Ollama API, e.g. ``http://10.0.0.11:11434`` (no trailing slash)."""
        ...

    @property
    def ssh_host(self) -> str:
        """The host to reach over SSH (``ssh_host`` in settings, else the node's host)."""
        ...

    @property
    def ssh_port(self) -> int: ...

    @property
    def ssh_user(self) -> str | None:
        """The SSH login; None means the local user's name."""
        ...

    @property
    def ssh_key_path(self) -> str | None:
        """A private key file; None means the usual defaults (``~/.ssh/id_*``, the agent)."""
        ...

    @property
    def known_hosts(self) -> str:
        """The known_hosts file the node's host key must be listed in. Never empty:
        a transport must not connect to a host whose key it cannot check."""
        ...

    @property
    def connect_timeout(self) -> float:
        """Seconds to open a connection (TCP, and the SSH handshake)."""
        ...


class PullProgress(Protocol):
    """Where a transport reports a pull's progress; the sync engine provides it."""

    def __call__(self, status: str, completed: int, total: int) -> None:
        """``status`` is the node's latest status text ("pulling manifest", "pulling
        8eeb52dfb3bb", "verifying sha256 digest"); ``completed`` and ``total`` are bytes
        summed over the layers seen so far (0 when unknown). Cheap and non-blocking."""
        ...


class PullError(Exception):
    """A pull that did not succeed; ``str(error)`` says why, for people.

    ``retryable``: trying again later may help (network trouble, a node error, a stall).
    ``node_fatal``: nothing should be tried on this node in this run (an unknown or
    changed SSH host key, refused credentials); the engine skips its other models.
    """

    def __init__(self, message: str, *, retryable: bool = True, node_fatal: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable and not node_fatal
        self.node_fatal = node_fatal


class PullTransport(Protocol):
    """Downloads a model onto a node (``transport`` in a node's settings picks one).

    Contract:

    - The class is constructed with no arguments, once per sync run. ``pull`` may be
      called concurrently, for different nodes and for the same node; ``aclose`` is
      called once at the end of the run, after every pull has returned, and releases
      whatever the transport kept open (sessions, connections).
    - ``pull`` validates ``model`` with ``daemon.domain.ModelRef.parse`` before it builds
      any request or command, raising ``ValueError`` for a name Ollama would refuse.
    - ``pull`` returns when the node reports success and raises :class:`PullError`
      otherwise (other exceptions are treated as retryable failures, but say less).
    - Progress goes to ``progress`` whenever something changes. The engine counts a
      change of status or completed bytes as activity and cancels a pull that shows none
      for the stall timeout (then retries it: Ollama resumes partial downloads), and it
      cancels pulls still running when the download window closes. So ``pull`` must be
      cancellable at every ``await`` and must release its request or channel on
      cancellation.
    - Retries, backoff, parallelism and deadlines are the engine's business, not the
      transport's: one call is one attempt.
    """

    async def pull(self, target: PullTarget, model: str, progress: PullProgress) -> None:
        """Pull ``model`` onto ``target``; return on success, raise PullError otherwise."""
        ...

    async def aclose(self) -> None:
        """Release everything the transport holds. Called once, at the end of the run."""
        ...


@dataclass(frozen=True, slots=True)
class SharedAnswer:
    """What the cluster's shared limits said of one request.

    ``refused`` names the limit that refuses it (``requests``, ``tokens``, ``budget``) or
    is None; ``wait`` is the seconds until it would pass; ``*_left`` what the buckets hold
    after it (None for a limit the tenant does not have).
    """

    refused: str | None
    wait: float
    requests_left: float | None
    tokens_left: float | None


class SharedQuota(Protocol):
    """Tenants' per minute limits, budgets and usage shared by several gateways (Redis).

    ``take`` runs before a request waits (one round trip; None when the shared store does
    not answer: the gateway then enforces ``1 / gateways`` of each limit alone); the rest
    is sent in batches by ``flush``, off the request path.
    """

    gateways: int

    async def take(self, config: Any, estimate: int, period_start: float) -> SharedAnswer | None:
        """Admit one request of ``config``'s tenant (a TenantSettings), or say why not."""
        ...

    def settle(self, config: Any, delta: int, used: int, period_start: float) -> None:
        """An answer used ``delta`` tokens more than its estimate, ``used`` in all."""
        ...

    async def flush(
        self, usage: Mapping[tuple[str, str, str, str], float], period_seconds: Mapping[str, int]
    ) -> bool:
        """Send what was settled and the usage counts; False when the store is down."""
        ...

    async def usage_rows(self, days: list[str]) -> list[tuple[str, str, str, str, float]] | None:
        """Every gateway's usage counts for ``days``; None when the store is down."""
        ...


@runtime_checkable
class ModelTransport(PullTransport, Protocol):
    """A transport that can also do what gateway mode needs (``[distribution] mode =
    "gateway"``): pull from olmd's registry endpoint without TLS, then give the model its
    short name and remove the long one. Both built-in transports are one.

    Same contract as :class:`PullTransport` for :meth:`pull_from`; :meth:`copy` and
    :meth:`delete` are single attempts too, raising :class:`PullError` on failure
    (``delete`` of a name the node does not hold is not a failure).
    """

    async def pull_from(
        self, target: PullTarget, model: str, progress: PullProgress, *, insecure: bool
    ) -> None:
        """Pull ``model`` (``host:port/ns/name:tag``); ``insecure``: plain HTTP allowed."""
        ...

    async def copy(self, target: PullTarget, source: str, destination: str) -> None:
        """Give ``source``'s manifest the name ``destination`` too (blobs are shared)."""
        ...

    async def delete(self, target: PullTarget, model: str) -> None:
        """Remove the name ``model`` (blobs another name uses stay)."""
        ...
