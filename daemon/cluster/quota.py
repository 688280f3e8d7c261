"""Tenants' limits, budgets and usage shared by the gateways of a cluster, in Redis.

Per minute limits are token buckets kept in Redis and taken by one Lua script per
request (both buckets and the budget checked and debited at once, on Redis's clock), so
two gateways together admit what one would. What an answer used beyond its estimate, the
budget's spending and the usage counts are sent in batches every flush, off the request
path. When Redis does not answer, :meth:`SharedQuota.take` says so (None) and the gateway
enforces its share of each limit alone (limit / the gateways last seen alive).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from daemon.cluster.client import Cluster, ClusterDown
from daemon.ports import SharedAnswer
from daemon.sections import TenantSettings

__all__ = ["SharedQuota"]

# KEYS: requests bucket, tokens bucket, budget counter.
# ARGV: requests per minute, tokens per minute, the estimate, the budget, bucket ttl (ms).
# Levels are kept in thousandths. Returns {verdict, wait ms, requests left, tokens left}:
# verdict 0 admitted, 1 requests, 2 tokens, 3 budget.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, per_minute)
  if per_minute <= 0 then return -1 end
  local cap = per_minute * 1000
  local v = redis.call('HMGET', key, 'l', 't')
  local l = tonumber(v[1]) or cap
  local at = tonumber(v[2]) or now
  l = math.min(cap, l + (now - at) * per_minute / 60)
  return l
end
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local amount, budget, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local rl, tl = level(KEYS[1], rpm), level(KEYS[2], tpm)
if budget > 0 and (tonumber(redis.call('GET', KEYS[3])) or 0) >= budget then
  return {3, 0, rl, tl}
end
if rpm > 0 and rl < 1000 then
  return {1, math.ceil((1000 - rl) * 60 / rpm), rl, tl}
end
local need = math.min(amount, tpm) * 1000
if tpm > 0 and (tl <= 0 or tl < need) then
  return {2, math.ceil((math.max(need, 1000) - tl) * 60 / tpm), rl, tl}
end
if rpm > 0 then
  rl = rl - 1000
  redis.call('HSET', KEYS[1], 'l', rl, 't', now)
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if tpm > 0 then
  tl = tl - amount * 1000
  redis.call('HSET', KEYS[2], 'l', tl, 't', now)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {0, 0, rl, tl}
"""

# KEYS: tokens bucket, budget counter. ARGV: tokens per minute, tokens to take (or give
# back when negative), tokens to add to the budget, bucket ttl (ms), budget ttl (ms).
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tpm, delta, used = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if tpm > 0 and delta ~= 0 then
  local cap = tpm * 1000
  local v = redis.call('HMGET', KEYS[1], 'l', 't')
  local l = tonumber(v[1]) or cap
  local at = tonumber(v[2]) or now
  l = math.min(cap, l + (now - at) * tpm / 60) - delta * 1000
  redis.call('HSET', KEYS[1], 'l', l, 't', now)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
end
if used > 0 then
  redis.call('INCRBY', KEYS[2], used)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]))
end
return 1
"""

_BUCKET_TTL_MS = 120_000
_SEP = "\t"


class SharedQuota:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.gateways = 1  # live gateways, as last seen
        self._take: Any = None
        self._settle: Any = None
        self._pending: dict[tuple[str, float], list[int]] = {}  # (tenant, period) → [Δ, used]
        self._configs: dict[str, TenantSettings] = {}

    def _keys(self, tenant: str, period_start: float) -> list[str]:
        key = self.cluster.key
        return [
            key("tenant", tenant, "requests"),
            key("tenant", tenant, "tokens"),
            key("tenant", tenant, "budget", str(int(period_start))),
        ]

    async def take(
        self, config: TenantSettings, estimate: int, period_start: float
    ) -> SharedAnswer | None:
        """Admit one request in Redis, or say which limit refuses it; None if Redis is down."""
        if self._take is None:
            self._take = self.cluster.redis.register_script(_TAKE)
        keys = self._keys(config.name, period_start)
        args = [
            config.requests_per_minute,
            config.tokens_per_minute,
            estimate,
            config.budget_tokens,
            _BUCKET_TTL_MS,
        ]
        try:
            verdict, wait_ms, requests, tokens = await self.cluster.call(
                lambda r: self._take(keys=keys, args=args)
            )
        except ClusterDown:
            return None
        kinds = {1: "requests", 2: "tokens", 3: "budget"}
        return SharedAnswer(
            refused=kinds.get(int(verdict)),
            wait=int(wait_ms) / 1000,
            requests_left=None if int(requests) < 0 else int(requests) / 1000,
            tokens_left=None if int(tokens) < 0 else int(tokens) / 1000,
        )

    def settle(self, config: TenantSettings, delta: int, used: int, period_start: float) -> None:
        """An answer used ``delta`` tokens beyond its estimate, and ``used`` in all: sent
        at the next flush."""
        self._configs[config.name] = config
        entry = self._pending.setdefault((config.name, period_start), [0, 0])
        entry[0] += delta
        entry[1] += used if config.budget_tokens else 0

    async def budget_used(self, tenant: str, period_start: float) -> int | None:
        try:
            text = await self.cluster.call(lambda r: r.get(self._keys(tenant, period_start)[2]))
        except ClusterDown:
            return None
        return int(text or 0)

    async def flush(
        self, usage: Mapping[tuple[str, str, str, str], float], period_seconds: Mapping[str, int]
    ) -> bool:
        """Send what answers used and the usage counts; False if the usage counts were not
        sent (the caller keeps them for the next flush). Each settlement leaves the
        pending ones only once Redis took it, so nothing is sent twice."""
        if self._settle is None:
            self._settle = self.cluster.redis.register_script(_SETTLE)
        try:
            for (tenant, start), entry in list(self._pending.items()):
                config = self._configs[tenant]
                keys = self._keys(tenant, start)
                ttl = int((period_seconds.get(tenant, 86400) + 86400) * 1000)
                delta, used = entry
                args = [config.tokens_per_minute, delta, used, _BUCKET_TTL_MS, ttl]
                await self._run_settle([keys[1], keys[2]], args)
                entry[0] -= delta  # what arrived meanwhile stays pending
                entry[1] -= used
                if entry == [0, 0]:
                    self._pending.pop((tenant, start), None)
            if usage:
                await self.cluster.call(lambda r: self._add_usage(r, usage))
        except ClusterDown:
            return False
        try:
            members = await self.cluster.call(lambda r: r.scard(self.cluster.key("gateways")))
            self.gateways = max(1, int(members or 1))
        except ClusterDown:
            pass  # the usage went: only the count of gateways is stale
        return True

    async def _run_settle(self, keys: list[str], args: list[int]) -> None:
        await self.cluster.call(lambda r: self._settle(keys=keys, args=args))

    async def _add_usage(
        self, redis: Any, usage: Mapping[tuple[str, str, str, str], float]
    ) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            for (day, tenant, model, name), value in usage.items():
                field = _SEP.join((tenant, model, name))
                pipe.hincrbyfloat(self.cluster.key("usage", day), field, value)
            await pipe.execute()

    async def usage_rows(self, days: list[str]) -> list[tuple[str, str, str, str, float]] | None:
        """(day, tenant, model, field, value) for ``days``, as every gateway counted them."""

        async def read(redis: Any) -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(self.cluster.key("usage", day))
                result: list[Any] = await pipe.execute()
            return result

        try:
            tables = await self.cluster.call(read)
        except ClusterDown:
            return None
        rows = []
        for day, table in zip(days, tables, strict=True):
            for field, value in (table or {}).items():
                tenant, model, name = str(field).split(_SEP, 2)
                rows.append((day, tenant, model, name, float(value)))
        return rows
