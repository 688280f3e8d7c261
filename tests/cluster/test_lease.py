"""The sync lease and the fenced record against a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest

from daemon.cluster.client import ClusterDown
from daemon.cluster.lease import Lease, LeaseHeld, fence_key, lease_key, read_holder
from daemon.cluster.record import Fenced, SharedRecord


async def test_one_holder_at_a_time_each_with_a_larger_fence(clusters) -> None:
    a, b = clusters
    first = await Lease.acquire(a, "sync", seconds=10)
    assert first.fence == 1 and first.held
    with pytest.raises(LeaseHeld, match="gw-a holds the sync lease") as refused:
        await Lease.acquire(b, "sync", seconds=10)
    assert refused.value.holder is not None and refused.value.holder.gateway == "gw-a"
    holder = await read_holder(b, "sync")
    assert holder is not None and holder.gateway == "gw-a"
    assert holder.seconds_left is not None and 9 < holder.seconds_left <= 10

    # Only the holder releases it: a stranger's value deletes nothing.
    stranger = Lease(b, "sync", "gw-b/1/not-the-holder", 99, 10)
    assert not await stranger.release()
    assert await read_holder(b, "sync") is not None
    assert await first.release()
    assert await read_holder(b, "sync") is None

    second = await Lease.acquire(b, "sync", seconds=10)
    assert second.fence == 2
    # A floor lifts the counter (a Redis that lost its data must not reissue numbers).
    await second.release()
    third = await Lease.acquire(a, "sync", seconds=10, floor=41)
    assert third.fence == 42
    await third.close()
    assert await a.call(lambda r: r.get(fence_key(a, "sync"))) == "42"


async def test_renewal_extends_and_an_expired_lease_goes_to_the_next(clusters) -> None:
    a, b = clusters
    lease = await Lease.acquire(a, "sync", seconds=0.4)
    await asyncio.sleep(0.25)
    assert await lease.renew()  # compare-and-pexpire: another 0.4 s from now
    await asyncio.sleep(0.25)
    with pytest.raises(LeaseHeld):
        await Lease.acquire(b, "sync", seconds=5)
    await asyncio.sleep(0.3)  # no renewal: it expires
    successor = await Lease.acquire(b, "sync", seconds=5)
    assert successor.fence == lease.fence + 1
    assert not await lease.renew()  # the old holder finds out, and cannot take it back
    assert lease.lost == "gw-b took the sync lease over" and not lease.held
    assert not await lease.release()
    assert (await read_holder(a, "sync")).gateway == "gw-b"  # type: ignore[union-attr]
    await successor.close()


async def test_kept_alive_while_it_lives_and_lost_when_taken(clusters) -> None:
    a, b = clusters
    lease = await Lease.acquire(a, "sync", seconds=0.6)
    lost: list[str] = []
    lease.keep(lost.append)
    await asyncio.sleep(1.5)  # well past its length: the renewals hold it
    assert lease.held and not lost
    with pytest.raises(LeaseHeld):
        await Lease.acquire(b, "sync", seconds=5)
    # Taken from under it (as if it had been paused past its expiry).
    await b.call(lambda r: r.delete(lease_key(b, "sync")))
    successor = await Lease.acquire(b, "sync", seconds=5)
    for _ in range(50):
        if lost:
            break
        await asyncio.sleep(0.05)
    assert lost == ["gw-b took the sync lease over"]
    await lease.close()  # releases nothing: it is not the holder
    assert (await read_holder(b, "sync")).gateway == "gw-b"  # type: ignore[union-attr]
    await successor.close()


async def test_redis_down_past_the_lease_counts_as_lost(clusters, redis_server) -> None:
    a, _ = clusters
    lease = await Lease.acquire(a, "sync", seconds=1.2)
    lost: list[str] = []
    gone = asyncio.Event()

    def on_lost(reason: str) -> None:
        lost.append(reason)
        gone.set()

    lease.keep(on_lost)
    await redis_server.stop()
    t0 = time.monotonic()
    async with asyncio.timeout(3):
        await gone.wait()
    waited = time.monotonic() - t0
    assert lost and "Redis did not answer while the sync lease ran out" in lost[0]
    assert waited < 1.2  # before anyone else could have taken it
    assert not lease.held
    await lease.close()  # Redis is down: nothing to release, nothing raised
    with pytest.raises(ClusterDown):
        await Lease.acquire(a, "sync", seconds=1)


async def test_the_record_refuses_a_writer_older_than_the_newest_fence(clusters) -> None:
    a, b = clusters
    old = await Lease.acquire(a, "sync", seconds=0.2)
    record_a, record_b = SharedRecord(a, "sync"), SharedRecord(b, "sync")
    await record_a.write(old.fence, {"state": "running", "gateway": "gw-a"})
    assert await record_b.read() == {"fence": "1", "state": "running", "gateway": "gw-a"}
    await asyncio.sleep(0.3)
    new = await Lease.acquire(b, "sync", seconds=5)
    await record_b.write(new.fence, {"state": "ok", "gateway": "gw-b"})
    with pytest.raises(Fenced, match="fence 2; this one has 1"):
        await record_a.write(old.fence, {"state": "failed", "gateway": "gw-a"})
    assert await record_a.read(["state", "gateway", "fence", "missing"]) == {
        "state": "ok",
        "gateway": "gw-b",
        "fence": "2",
    }
    assert await record_a.newest_fence() == 2
    await new.close()
