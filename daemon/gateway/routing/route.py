"""A route: the node one attempt goes to and why, or why there is none.

:class:`Route` holds the node's slot until ``Router.release``; :class:`Wait` is the
router's answer when the best node has no free slot but is worth waiting for;
:class:`NoNode` carries the status a client gets when no node can take the request.
"""

from __future__ import annotations

from dataclasses import dataclass

from daemon.gateway.fleet import Node
from daemon.gateway.routing.prompts import EMPTY, Prompt
from daemon.tenancy.tenancy import Ticket


class NoNode(Exception):
    """No node can take the request. ``status`` is what the client gets."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(eq=False, slots=True)
class Route:
    """One attempt's node and why, its slot taken; give it back with ``Router.release``."""

    node: Node
    key: str
    reason: str
    estimate: float | None = None  # seconds to the first token, for a cost balancer
    cached_tokens: int = 0
    expected_cold: bool = False
    started: float = 0.0
    prompt: Prompt = EMPTY
    session: str | None = None
    released: bool = False
    ticket: Ticket | None = None  # the tenant's admission, when tenancy is on
    counted: bool = True  # holds a slot (a cloud model's request holds none)
    ahead: int = 0  # olmd's requests on the node for the model when this one was sent
    probe: bool = False  # one more than the node's learned slots: to learn its figure
    interactive: bool = True  # an interactive tenant's (counts against the headroom)


@dataclass(frozen=True, slots=True)
class Wait:
    """The router's answer when the choice is a node without a free slot: wait for it."""

    node: Node
    patience: float
    reason: str
