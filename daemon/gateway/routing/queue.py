"""The fleet-wide queue: requests that found no free slot, in a fair order.

One queue per model. When a slot frees (``dispatch``), the fair-share policy
(:mod:`daemon.tenancy.fair`) says which tenant goes next: interactive before batch,
tenants by weight within a priority; within a tenant the oldest waiter that some node can
now take gets the slot, on whichever node that is, so no node idles while another
queues. Within a tenant, the waiter whose prompt costs least to start goes first (a short
follow-up whose history the node holds before a long first turn), with ageing: each
second waited counts as a second less cost, so nothing starves. Without a cost-aware
strategy every cost is nil: first come, first served.
A waiter the cost balancer wants on one node (its conversation's cache is there) waits
for that node only, letting the others pass, until its patience runs out; then it takes
any node. Waiters also look again every ``_REPOLL`` seconds, for slots that
no release announces (a node back from cooldown, a reload that raised the slots).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from daemon.gateway.fleet import Node
from daemon.gateway.routing.prompts import Prompt
from daemon.gateway.routing.route import NoNode, Route, Wait
from daemon.ports import RouteRequest
from daemon.settings import RoutingSettings
from daemon.tenancy.fair import DEFAULT_SHARE, FairShares, Share

_REPOLL = 0.5


class Picker(Protocol):
    """What the queue needs of the router."""

    def pick(
        self,
        request: RouteRequest,
        prompt: Prompt,
        exclude: Collection[str],
        *,
        prefer: str | None = None,
        may_wait: bool = True,
        share: Share = DEFAULT_SHARE,
    ) -> Route | Wait | None: ...

    def candidates(self, key: str, exclude: Collection[str] = ()) -> list[Node]: ...

    def room_on(self, node: str, key: str) -> bool | None:
        """Whether ``node`` has a free slot for ``key`` now; None when it cannot serve it
        at all (gone, not routable, not holding the model)."""
        ...

    def release(self, route: Route) -> None: ...

    def prefill_seconds(self, request: RouteRequest, prompt: Prompt) -> float:
        """What evaluating the part of the prompt no node holds would take (0: unknown)."""
        ...


@dataclass(eq=False)
class _Waiter:
    request: RouteRequest
    prompt: Prompt
    exclude: Collection[str]
    future: asyncio.Future[Route] = field(repr=False)
    share: Share = DEFAULT_SHARE
    since: float = 0.0  # the loop's clock when it began waiting
    cost: float = 0.0  # seconds its prompt's prefill would take (see ``_turn``)
    # A cost balancer chose a node without a free slot (its cache is worth the wait):
    # only that node serves this waiter until ``prefer_until`` (the loop's clock).
    prefer: str | None = None
    prefer_reason: str = ""
    prefer_until: float = 0.0
    preferred_once: bool = False  # a waiter waits for one node at most once


class FleetQueue:
    def __init__(self, picker: Picker, routing: RoutingSettings, fair: FairShares) -> None:
        self.picker = picker
        self.routing = routing
        self.fair = fair
        self.queued = 0
        self.queued_by: dict[str, int] = {}  # tenant → its requests waiting
        self.waiting_for: dict[str, int] = {}  # node → waiters that wait for it only
        self._queue: dict[str, deque[_Waiter]] = {}
        self._looked: dict[str, float] = {}  # model → when a waiter last looked again

    def has_waiters(self, key: str) -> bool:
        return bool(self._queue.get(key))

    async def wait(
        self,
        request: RouteRequest,
        prompt: Prompt,
        exclude: Collection[str],
        wait: Wait | None,
        share: Share = DEFAULT_SHARE,
    ) -> Route:
        """Queue the request until a node has a slot for it (or ``wait.node`` has, for
        ``wait.patience``); NoNode 503 beyond ``queue_limit`` or after ``queue_timeout``,
        429 beyond the tenant's own ``queue_limit``."""
        key = request.model
        if self.queued >= self.routing.queue_limit:
            raise NoNode(503, "all nodes for this model are at capacity", retry_after=1)
        tenant = share.tenant
        mine = self.queued_by.get(tenant, 0)
        if share.queue_limit and mine >= share.queue_limit:
            raise NoNode(
                429,
                f"tenant {tenant!r} has {mine} requests waiting, its queue_limit",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Route] = loop.create_future()
        waiter = _Waiter(request, prompt, exclude, future, share, loop.time())
        if prompt.hashes:
            waiter.cost = self.picker.prefill_seconds(request, prompt)
        if wait is not None:
            self._prefer(waiter, wait, loop.time())
        queue = self._queue.setdefault(key, deque())
        queue.append(waiter)
        self.queued += 1
        self.queued_by[tenant] = mine + 1
        try:
            async with asyncio.timeout(self.routing.queue_timeout):
                self.dispatch(key)
                while not future.done():
                    step = _REPOLL
                    if waiter.prefer is not None:
                        step = min(step, max(0.0, waiter.prefer_until - loop.time()) + 0.001)
                    await asyncio.wait((future,), timeout=step)
                    if future.done():
                        break
                    # Look again for slots no release announced: once per _REPOLL per
                    # model, whatever the number of waiters (each pass costs O(waiters)).
                    now = loop.time()
                    expired = waiter.prefer is not None and now >= waiter.prefer_until
                    if expired or now - self._looked.get(key, 0.0) >= _REPOLL:
                        self._looked[key] = now
                        self.dispatch(key)
        except TimeoutError:
            if not future.done():
                raise NoNode(
                    503, "timed out waiting for a node with capacity", retry_after=1
                ) from None
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.picker.release(future.result())  # a slot handed over just as the client left
            raise
        finally:
            self.queued -= 1
            left = self.queued_by.get(tenant, 1) - 1
            if left > 0:
                self.queued_by[tenant] = left
            else:
                self.queued_by.pop(tenant, None)
            self._unprefer(waiter)
            if not future.done():
                future.cancel()
            if waiter in queue:
                queue.remove(waiter)
            if not queue and self._queue.get(key) is queue:
                del self._queue[key]
                self._looked.pop(key, None)
        return future.result()

    def _prefer(self, waiter: _Waiter, wait: Wait, now: float) -> None:
        waiter.prefer = wait.node.name
        waiter.prefer_reason = wait.reason
        waiter.prefer_until = now + wait.patience
        waiter.preferred_once = True
        self.waiting_for[wait.node.name] = self.waiting_for.get(wait.node.name, 0) + 1

    def _unprefer(self, waiter: _Waiter) -> None:
        name = waiter.prefer
        if name is None:
            return
        waiter.prefer = None
        left = self.waiting_for.get(name, 0) - 1
        if left > 0:
            self.waiting_for[name] = left
        else:
            self.waiting_for.pop(name, None)

    def dispatch(self, first: str | None = None) -> None:
        """Hand free slots to waiters, in the fair order per model; ``first``'s model first.

        A waiter that waits for one node (its cache is there) lets the others pass while
        that node is full, until its patience runs out; then it takes any node.
        """
        keys = list(self._queue)
        if first in self._queue:
            keys.remove(first)
            keys.insert(0, first)
        now = asyncio.get_running_loop().time()
        for key in keys:
            queue = self._queue.get(key)
            if not queue:
                continue
            # Exclusion sets (a retry's tried nodes) for which no node had room: a waiter
            # excluding at least as much cannot find room either.
            blocked: list[frozenset[str]] = []
            tried: set[int] = set()  # waiters that found no room in this pass
            while self._place_next(key, queue, now, blocked, tried):
                pass

    def _place_next(
        self,
        key: str,
        queue: deque[_Waiter],
        now: float,
        blocked: list[frozenset[str]],
        tried: set[int],
    ) -> bool:
        """Give one free slot to the waiter whose turn it is; False when none can take one."""
        by_share: dict[Share, list[_Waiter]] = {}
        for waiter in list(queue):
            if waiter.future.done():
                queue.remove(waiter)
            elif id(waiter) not in tried:
                by_share.setdefault(waiter.share, []).append(waiter)
        shares = self.fair.order(by_share) if len(by_share) > 1 else list(by_share)
        for share in shares:
            for waiter in sorted(by_share[share], key=lambda w: w.cost - (now - w.since)):
                if self._try(waiter, key, queue, now, blocked):
                    self.fair.served(share)
                    return True
                tried.add(id(waiter))
        return False

    def _try(
        self,
        waiter: _Waiter,
        key: str,
        queue: deque[_Waiter],
        now: float,
        blocked: list[frozenset[str]],
    ) -> bool:
        """Whether ``waiter`` got a slot (or an answer: a NoNode ends its wait too)."""
        if waiter.prefer is not None:
            room = self.picker.room_on(waiter.prefer, key)
            if now >= waiter.prefer_until or room is None:
                self._unprefer(waiter)  # patience out, or the node is gone: any node
            elif not room:
                return False  # still full: let the others pass
        excluded = frozenset(waiter.exclude)
        if waiter.prefer is None and any(b <= excluded for b in blocked):
            return False
        try:
            picked = self.picker.pick(
                waiter.request,
                waiter.prompt,
                waiter.exclude,
                prefer=waiter.prefer,
                may_wait=not waiter.preferred_once,
                share=waiter.share,
            )
        except NoNode as exc:
            if waiter.prefer is not None:  # its node is gone: take any
                self._unprefer(waiter)
                return False
            queue.remove(waiter)
            waiter.future.set_exception(exc)
            return False
        if isinstance(picked, Wait):
            self._prefer(waiter, picked, now)
            return False
        if picked is None:
            if waiter.prefer is None and not waiter.share.batch:
                blocked.append(excluded)  # (a batch waiter may be held back by headroom)
            return False
        queue.remove(waiter)
        if waiter.prefer is not None:  # waited for this node, for that reason
            picked.reason = waiter.prefer_reason
        self._unprefer(waiter)
        waiter.future.set_result(picked)
        return True
