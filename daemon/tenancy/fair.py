"""Who goes next when a slot frees: interactive before batch, tenants by weight within a
priority, first come first served within a tenant. Pure policy: no I/O, no clock of its
own; the fleet-wide queue asks it.

Shares are start-time fair queueing (Goyal et al.), per priority: a tenant served once
advances its tag by 1 / weight; the backlogged tenant with the smallest tag goes next. A
tenant that was idle starts from the priority's virtual time (the tag of the last one
served), so an idle spell earns no credit: a tenant with 24 requests waiting and one with
1 take turns, and weights 2 : 1 get slots 2 : 1.

Headroom: while interactive requests for a model were seen in the last ``window``
seconds, batch requests leave ``reserve`` slots free across the model's holders (the
router counts interactive requests running against it), so a chat turn usually finds a
slot at once. With no interactive traffic batch takes every slot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["BATCH", "INTERACTIVE", "FairShares", "Share"]

INTERACTIVE, BATCH = 0, 1
_PRIORITIES = {"interactive": INTERACTIVE, "batch": BATCH}


@dataclass(frozen=True, slots=True)
class Share:
    """A tenant as the queue sees it."""

    tenant: str
    priority: int = INTERACTIVE
    weight: float = 1.0
    queue_limit: int = 0  # its requests waiting at most; 0: no limit of its own

    @classmethod
    def of(cls, tenant: str, priority: str, weight: float, queue_limit: int = 0) -> Share:
        return cls(tenant, _PRIORITIES[priority], weight, queue_limit)

    @property
    def batch(self) -> bool:
        return self.priority == BATCH


DEFAULT_SHARE = Share("default")


class FairShares:
    def __init__(self, window: float = 30.0, reserve: int = 1) -> None:
        self.window = window
        self.reserve = reserve
        self._tag: dict[str, float] = {}  # tenant → its finish tag
        self._virtual: dict[int, float] = {}  # priority → the start tag last served
        self._interactive_seen: dict[str, float] = {}  # model → when (the caller's clock)

    def configure(self, window: float, reserve: int) -> None:
        self.window, self.reserve = window, reserve

    def start_tag(self, share: Share) -> float:
        return max(self._tag.get(share.tenant, 0.0), self._virtual.get(share.priority, 0.0))

    def order(self, shares: Iterable[Share]) -> list[Share]:
        """The backlogged tenants, the one to serve first first."""
        return sorted(set(shares), key=lambda s: (s.priority, self.start_tag(s), s.tenant))

    def served(self, share: Share) -> None:
        """``share`` got a slot: advance its tag (and the priority's virtual time)."""
        start = self.start_tag(share)
        self._virtual[share.priority] = start
        self._tag[share.tenant] = start + 1.0 / share.weight

    def saw(self, share: Share, model: str, now: float) -> None:
        """A request of ``share`` for ``model`` arrived (interactive ones keep headroom)."""
        if share.priority == INTERACTIVE:
            self._interactive_seen[model] = now

    def reserve_for(self, share: Share, model: str, now: float) -> int:
        """Slots a request of ``share`` must leave free on ``model``'s holders."""
        if share.priority != BATCH or not self.reserve:
            return 0
        seen = self._interactive_seen.get(model)
        return self.reserve if seen is not None and now - seen <= self.window else 0
