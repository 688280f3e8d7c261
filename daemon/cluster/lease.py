"""A fleet-wide lock: a lease in Redis with a fencing number (the sync's, one run per window).

* :meth:`Lease.acquire` runs one Lua script: ``SET <lease> <holder> NX PX <ms>`` and, only
  if that took, ``INCR <fence>``. So the fencing number is taken atomically with the lease,
  and every holder gets a larger one than every holder before it. ``floor`` lifts the
  counter first to a number the caller already saw (a Redis that lost its data starts
  again from zero; fences must not).
* :meth:`Lease.keep` renews it every third of its length while the run lives (Lua:
  compare the holder, then ``PEXPIRE``), and calls ``on_lost`` once when it cannot: the
  key now names another holder or none, or Redis did not answer until the lease had
  almost run out (a sixth of it left, so the holder stops before another can start).
* :meth:`Lease.release` deletes it only if this holder still holds it (compare, ``DEL``).

A lease can be lost without its holder noticing in time (a paused process, a partition):
the fencing number is what protects the others. Whatever a holder writes carries it, and
writes refuse when a newer one was issued (:mod:`daemon.cluster.record`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon.cluster.client import Cluster, ClusterDown
from daemon.logs import get_logger

__all__ = ["Lease", "LeaseHeld", "LeaseHolder", "fence_key", "lease_key", "read_holder"]

log = get_logger("olmd.cluster")

# Lost once less than this share of the lease is left without a renewal: the holder's
# pulls stop before another gateway can take the lease over.
_SAFETY = 1 / 6

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
  local floor = tonumber(ARGV[3])
  if seen < floor then redis.call('SET', KEYS[2], floor) end
  return {redis.call('INCR', KEYS[2]), ''}
end
return {0, redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1])}
"""
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then return {redis.call('PEXPIRE', KEYS[1], ARGV[2]), ''} end
return {0, current or ''}
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(cluster: Cluster, name: str) -> str:
    return cluster.key("lease", name)


def fence_key(cluster: Cluster, name: str) -> str:
    """The counter of fencing numbers issued for lease ``name``: the newest holder's."""
    return cluster.key("fence", name)


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease, from its value ``<gateway>/<pid>/<token>``."""

    gateway: str
    value: str
    seconds_left: float | None = None

    @classmethod
    def parse(cls, value: str, ttl_ms: int | None = None) -> LeaseHolder:
        left = ttl_ms / 1000 if ttl_ms is not None and ttl_ms >= 0 else None
        return cls(value.split("/", 1)[0] or "unknown", value, left)


class LeaseHeld(Exception):
    """Another holder has the lease; ``holder`` says who (None: it just went)."""

    def __init__(self, name: str, holder: LeaseHolder | None) -> None:
        self.holder = holder
        who = holder.gateway if holder is not None else "another gateway"
        left = ""
        if holder is not None and holder.seconds_left is not None:
            left = f", {holder.seconds_left:.0f} s left unless renewed"
        super().__init__(f"{who} holds the {name} lease{left}")


async def _eval(cluster: Cluster, script: str, keys: list[str], *args: object) -> Any:
    async def run(redis: Any) -> Any:
        return await redis.eval(script, len(keys), *keys, *args)

    return await cluster.call(run)


async def read_holder(cluster: Cluster, name: str) -> LeaseHolder | None:
    """Who holds lease ``name`` now; None if nobody. Raises ClusterDown."""
    key = lease_key(cluster, name)

    async def run(redis: Any) -> Any:
        async with redis.pipeline(transaction=True) as pipe:
            return await pipe.get(key).pttl(key).execute()

    value, ttl = await cluster.call(run)
    return None if not value else LeaseHolder.parse(str(value), int(ttl))


class Lease:
    """One holding of lease ``name``: its holder value and fencing number.

    ``lost`` is None while it is held and says why once it is not. Make one with
    :meth:`acquire`; :meth:`close` stops the renewals and releases it.
    """

    def __init__(self, cluster: Cluster, name: str, value: str, fence: int, seconds: float):
        self.cluster = cluster
        self.name = name
        self.value = value
        self.fence = fence
        self.seconds = seconds
        self.lost: str | None = None
        self._valid_until = 0.0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def acquire(cls, cluster: Cluster, name: str, *, seconds: float, floor: int = 0) -> Lease:
        """Take the lease for ``seconds`` or raise :class:`LeaseHeld`; ClusterDown when
        Redis does not answer. The fence is at least ``floor + 1``."""
        value = f"{cluster.name}/{os.getpid()}/{secrets.token_hex(6)}"
        keys = [lease_key(cluster, name), fence_key(cluster, name)]
        sent = time.monotonic()
        reply = await _eval(cluster, _ACQUIRE, keys, value, _ms(seconds), max(0, floor))
        fence = int(reply[0])
        if not fence:
            current = str(reply[1])
            holder = LeaseHolder.parse(current, int(reply[2])) if current else None
            raise LeaseHeld(name, holder)
        lease = cls(cluster, name, value, fence, seconds)
        lease._valid_until = sent + seconds
        log.info("lease_acquired", lease=name, gateway=cluster.name, fence=fence)
        return lease

    @property
    def held(self) -> bool:
        """Not lost, and renewed recently enough that nobody else can hold it yet."""
        return self.lost is None and time.monotonic() < self._valid_until

    async def renew(self) -> bool:
        """Extend the lease by its length; False (and ``lost`` set) if it is no longer
        ours. Raises ClusterDown when Redis does not answer."""
        sent = time.monotonic()
        reply = await _eval(
            self.cluster, _RENEW, [lease_key(self.cluster, self.name)], self.value,
            _ms(self.seconds),
        )  # fmt: skip
        if int(reply[0]):
            self._valid_until = sent + self.seconds
            return True
        other = str(reply[1])
        self._lose(
            f"{LeaseHolder.parse(other).gateway} took the {self.name} lease over"
            if other
            else f"the {self.name} lease expired"
        )
        return False

    async def release(self) -> bool:
        """Delete the lease if this holder still has it. Raises ClusterDown."""
        done = bool(await _eval(self.cluster, _RELEASE, [lease_key(self.cluster, self.name)],
                                self.value))  # fmt: skip
        if done:
            log.info("lease_released", lease=self.name, gateway=self.cluster.name,
                     fence=self.fence)  # fmt: skip
        return done

    def keep(self, on_lost: Callable[[str], None]) -> None:
        """Renew in the background until :meth:`close`; ``on_lost(reason)`` once, if
        the lease is lost meanwhile."""
        if self._task is None:
            self._task = asyncio.create_task(self._keep(on_lost), name=f"olmd-lease-{self.name}")

    async def _keep(self, on_lost: Callable[[str], None]) -> None:
        every = self.seconds / 3
        wait = every
        while self.lost is None:
            await asyncio.sleep(wait)
            try:
                ours = await self.renew()
            except ClusterDown as exc:
                left = self._valid_until - time.monotonic()
                if left <= self.seconds * _SAFETY:
                    self._lose(
                        f"Redis did not answer while the {self.name} lease ran out "
                        f"({self.seconds:g} s): {exc}"
                    )
                    break
                wait = min(every, max(0.05, left - self.seconds * _SAFETY) / 2)
                continue
            if not ours:
                break
            wait = every
        if self.lost is not None:
            on_lost(self.lost)

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            log.error("lease_lost", lease=self.name, gateway=self.cluster.name,
                      fence=self.fence, reason=reason)  # fmt: skip

    async def close(self) -> None:
        """Stop renewing and release the lease (left to expire if Redis does not answer)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.lost is None:
            with contextlib.suppress(ClusterDown):
                await self.release()
            self.lost = f"the {self.name} lease was released"


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
