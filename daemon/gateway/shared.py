"""The fleet as several gateways see it: this gateway's view out, the others' views in.

With the cluster on, :class:`SharedFleet` runs a loop that every ``publish_interval``
publishes what this gateway's own checks found (nodes it ejected or found down, with
since when) and its requests in flight per node and model, with the session pins it set,
and reads the same from the other gateways (:mod:`daemon.cluster.peers`). Applied to the
fleet, a node another gateway took out is skipped here too until its deadline, unless
this gateway's own good probe came after; the others' requests in flight count against
each node's slots; their pins join this gateway's. Nothing of this is on a request's
path: the router reads plain fields the loop set. When Redis does not answer, the
others' views are dropped and this gateway goes on on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from daemon.cluster.client import Cluster, ClusterDown
from daemon.cluster.peers import NodeReport, PeerExchange, PeerRecord
from daemon.gateway.fleet import Fleet, Node
from daemon.gateway.routing.router import Router
from daemon.logs import get_logger

log = get_logger("olmd.shared")


class SharedFleet:
    def __init__(
        self,
        fleet: Fleet,
        router: Router,
        cluster: Cluster,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.router = router
        self.cluster = cluster
        self.exchange = PeerExchange(cluster)
        self.clock = clock
        self.wall = wall
        self.peers: list[PeerRecord] = []
        self._seen: dict[str, float] = {}  # gateway → the last record's time applied
        self._task: asyncio.Task[None] | None = None
        router.share_pins = True

    def _to_wall(self, mono: float | None, now_mono: float, now_wall: float) -> float:
        return 0.0 if mono is None else now_wall - (now_mono - mono)

    def own_record(self) -> PeerRecord:
        now, wall = self.clock(), self.wall()
        nodes: dict[str, NodeReport] = {}
        for node in self.fleet:
            health = node.health
            out_until = out_since = 0.0
            if health.ejected_until > now and node.out_since is not None:
                out_until = wall + (health.ejected_until - now)
                out_since = self._to_wall(node.out_since, now, wall)
            down_since = self._to_wall(node.down_since, now, wall) if health.down else 0.0
            models_out = {
                key: wall + (h.ejected_until - now)
                for key, h in node.model_health.items()
                if h.ejected_until > now
            }
            nodes[node.name] = NodeReport(
                out_until=out_until,
                out_since=out_since or down_since,
                down=health.down,
                busy=dict(node.busy),
                models_out=models_out,
            )
        pins, self.router.recent_pins = self.router.recent_pins, {}
        return PeerRecord(self.cluster.name, wall, nodes, pins)

    def _give_back(self, record: PeerRecord) -> None:
        # Not published (Redis down): publish these pins next round, unless newer ones.
        self.router.recent_pins = {**record.sessions, **self.router.recent_pins}

    def apply(self, peers: list[PeerRecord]) -> None:
        """Take the other gateways' views into the fleet (replacing the last round's)."""
        now, wall = self.clock(), self.wall()
        horizon = self.cluster.settings.peer_timeout
        for node in self.fleet:
            busy: dict[str, int] = {}
            models_out: dict[str, float] = {}
            out_until = 0.0
            seen_good = self._to_wall(node.good_probe_at, now, wall)
            for peer in peers:
                report = peer.nodes.get(node.name)
                if report is None:
                    continue
                for model, count in report.busy.items():
                    busy[model] = busy.get(model, 0) + count
                for model, until in report.models_out.items():
                    if until > wall:  # probes say nothing of these: only their deadline
                        models_out[model] = max(models_out.get(model, 0.0), now + until - wall)
                if report.out_since <= seen_good:
                    continue  # our own good probe came after: it counts
                if report.down:  # no deadline: as long as that gateway keeps saying so
                    out_until = max(out_until, now + horizon)
                elif report.out_until > wall:
                    out_until = max(out_until, now + (report.out_until - wall))
            node.peer_busy = busy
            node.peer_models_out = models_out
            self._mark_out(node, out_until, now)
        for peer in peers:
            if peer.at <= self._seen.get(peer.gateway, 0.0):
                continue  # read before: its pins are no news, and ours may be fresher
            self._seen[peer.gateway] = peer.at
            for session, name in peer.sessions.items():
                self.router.pin(session, name)
        self.peers = peers

    def _mark_out(self, node: Node, until: float, now: float) -> None:
        was_out = node.peer_out_until > now
        node.peer_out_until = until
        if until > now and not was_out:
            log.info("node_out_by_peer", node=node.name, seconds=round(until - now, 1))

    def forget_peers(self) -> None:
        for node in self.fleet:
            node.peer_busy = {}
            node.peer_out_until = 0.0
            node.peer_models_out = {}
        self.peers = []

    async def round(self) -> None:
        """One publish-and-read round; on Redis trouble, drop the others' views."""
        record = self.own_record()
        try:
            peers = await self.exchange.exchange(record)
        except ClusterDown:
            self._give_back(record)
            self.forget_peers()
            return
        self.apply(peers)

    async def _run(self) -> None:
        interval = self.cluster.settings.publish_interval
        while True:
            try:
                await self.round()
            except Exception as exc:  # one bad round must not end the sharing
                log.error("shared_round_failed", error=repr(exc))
            await asyncio.sleep(interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="olmd-shared-fleet")

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        self.router.share_pins = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(ClusterDown):
            await self.exchange.leave()
