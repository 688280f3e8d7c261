"""A shared record that only the newest lease holder may write: one Redis hash.

The sync keeps its run there (state, progress while it runs, the last result, the
manifest), so every gateway tells the same story. Every write is fenced: one Lua script
compares the writer's fencing number with the newest one issued for the lease
(:func:`daemon.cluster.lease.fence_key`) and writes nothing if the writer's is older,
so a holder that lost its lease without knowing it (paused, partitioned) cannot write
over its successor's record. The script stores the writer's number as the field
``fence``. Values are strings; what they mean is the writer's business.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from daemon.cluster.client import Cluster
from daemon.cluster.lease import fence_key

__all__ = ["SharedRecord"]

_WRITE = """
local newest = tonumber(redis.call('GET', KEYS[1]) or '0')
if newest > tonumber(ARGV[1]) then return newest end
redis.call('HSET', KEYS[2], 'fence', ARGV[1], unpack(ARGV, 2))
return 0
"""


class Fenced(Exception):
    """A newer holder exists: this write was refused. ``newest`` is its fencing number."""

    def __init__(self, record: str, fence: int, newest: int) -> None:
        self.fence, self.newest = fence, newest
        super().__init__(
            f"a newer holder of the {record} lease exists (fence {newest}; this one has "
            f"{fence}): nothing was written"
        )


class SharedRecord:
    """The record ``<prefix>:<name>:record`` guarded by lease ``name``'s fence."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.key = cluster.key(name, "record")
        self.fence_key = fence_key(cluster, name)

    async def write(self, fence: int, fields: Mapping[str, str]) -> None:
        """Set ``fields`` (and ``fence``) if no newer fence was issued; else raise
        :class:`Fenced`. ClusterDown when Redis does not answer."""
        if not fields:
            return
        args: list[str] = [str(fence)]
        for name, value in fields.items():
            args += [name, value]

        async def run(redis: Any) -> Any:
            return await redis.eval(_WRITE, 2, self.fence_key, self.key, *args)

        newest = int(await self.cluster.call(run))
        if newest:
            raise Fenced(self.name, fence, newest)

    async def newest_fence(self) -> int:
        """The newest fencing number issued for the lease (0: none yet). ClusterDown."""

        async def run(redis: Any) -> Any:
            return await redis.get(self.fence_key)

        return int(await self.cluster.call(run) or 0)

    async def read(self, fields: Iterable[str] | None = None) -> dict[str, str]:
        """The record's fields (all, or ``fields``); missing ones are left out.
        ClusterDown when Redis does not answer."""
        names = list(fields) if fields is not None else None

        async def run(redis: Any) -> Any:
            if names is None:
                return await redis.hgetall(self.key)
            return await redis.hmget(self.key, names)

        reply = await self.cluster.call(run)
        if names is None:
            return {str(k): str(v) for k, v in dict(reply).items()}
        return {k: str(v) for k, v in zip(names, reply, strict=True) if v is not None}
