"""What each gateway tells the others about the fleet, and reads from them.

Every ``publish_interval`` a gateway writes one record under ``<prefix>:gw:<name>``,
expiring after ``peer_timeout``: per node, whether its own checks took the node out (an
ejection or a cooldown, with its deadline and when it began; down, and since when) and
how many requests it has in flight there per model; and the session pins it set lately.
In the same round it reads the records of the other gateways listed in
``<prefix>:gateways``. Times travel as wall-clock seconds (gateways do not share a
monotonic clock); hosts are expected to keep NTP time, and a skew of a few hundred
milliseconds only shifts when a shared ejection ends.

Pure data and one Redis round trip per interval; nothing here runs on a request's path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from daemon.cluster.client import Cluster


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One gateway's own view of one node."""

    out_until: float = 0.0  # wall clock: the gateway skips the node until then (0: not out)
    out_since: float = 0.0  # wall clock: when it took the node out
    down: bool = False
    busy: Mapping[str, int] = field(default_factory=dict)  # model → requests in flight
    # model → wall clock: models the gateway took out on this node alone (5xx answers)
    models_out: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """Everything one gateway publishes in a round."""

    gateway: str
    at: float  # wall clock of publication
    nodes: Mapping[str, NodeReport] = field(default_factory=dict)
    sessions: Mapping[str, str] = field(default_factory=dict)  # session key → node, recent

    def dumps(self) -> str:
        nodes = {
            name: {
                "out_until": r.out_until,
                "out_since": r.out_since,
                "down": r.down,
                "busy": dict(r.busy),
                "models_out": dict(r.models_out),
            }
            for name, r in self.nodes.items()
        }
        data = {"gateway": self.gateway, "at": self.at, "nodes": nodes}
        data["sessions"] = dict(self.sessions)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> PeerRecord | None:
        """A record read from Redis, or None when it is not one (another version, noise)."""
        try:
            data: Any = json.loads(text)
            nodes = {
                str(name): NodeReport(
                    out_until=float(r.get("out_until", 0.0)),
                    out_since=float(r.get("out_since", 0.0)),
                    down=bool(r.get("down", False)),
                    busy={str(m): int(c) for m, c in dict(r.get("busy", {})).items()},
                    models_out={str(m): float(t) for m, t in dict(r.get("models_out", {})).items()},
                )
                for name, r in dict(data["nodes"]).items()
            }
            sessions = {str(k): str(v) for k, v in dict(data.get("sessions", {})).items()}
            return cls(str(data["gateway"]), float(data["at"]), nodes, sessions)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class PeerExchange:
    """Publish this gateway's record and read the others', in one round trip."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._members = cluster.key("gateways")

    def _record_key(self, gateway: str) -> str:
        return self.cluster.key("gw", gateway)

    async def exchange(self, own: PeerRecord) -> list[PeerRecord]:
        """Write ``own``; return the other gateways' live records. ClusterDown if Redis
        does not answer."""
        ttl_ms = int(self.cluster.settings.peer_timeout * 1000)
        name = self.cluster.name

        async def round_trip(redis: Any) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set(self._record_key(name), own.dumps(), px=ttl_ms)
                pipe.sadd(self._members, name)
                pipe.smembers(self._members)
                result: list[Any] = await pipe.execute()
            return result

        _, _, members = await self.cluster.call(round_trip)
        others = sorted(m for m in members if m != name)
        if not others:
            return []
        texts = await self.cluster.call(lambda r: r.mget([self._record_key(m) for m in others]))
        records: list[PeerRecord] = []
        gone: list[str] = []
        for member, text in zip(others, texts, strict=True):
            record = PeerRecord.loads(str(text)) if text is not None else None
            if record is None:
                gone.append(member)  # expired: that gateway stopped publishing
            else:
                records.append(record)
        if gone:
            await self.cluster.call(lambda r: r.srem(self._members, *gone))
        return records

    async def leave(self) -> None:
        """Say goodbye (on stop): the others stop counting this gateway's requests now."""
        name = self.cluster.name

        async def bye(redis: Any) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.delete(self._record_key(name))
                pipe.srem(self._members, name)
                await pipe.execute()

        await self.cluster.call(bye)
