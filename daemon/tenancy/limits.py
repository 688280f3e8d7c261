"""A tenant's limits: requests and tokens per minute, requests at once, a token budget.

Per minute limits are token buckets (as OpenAI's and LiteLLM's are read by clients): the
bucket holds a minute's allowance, refills continuously, and a burst up to it passes at
once. Tokens are prompt + completion tokens: a request in flight holds its estimate until
its answer's final chunk says what it used. A budget is tokens per period (``"1d"``,
``"30d"``: periods counted from the epoch, in UTC), kept in the usage record so it
survives a restart. Everything here is checked before a request waits for a slot; none
of it ever holds a slot. Pure: the caller passes the clocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from daemon.sections import TenantSettings, period_seconds

__all__ = ["Bucket", "Refusal", "TenantLimits", "duration"]


def duration(seconds: float) -> str:
    """OpenAI's form for ``x-ratelimit-reset-*``: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass(slots=True)
class Bucket:
    capacity: float
    per_second: float
    level: float
    at: float

    @classmethod
    def per_minute(cls, limit: int, now: float) -> Bucket:
        return cls(float(limit), limit / 60.0, float(limit), now)

    def refill(self, now: float) -> None:
        if now > self.at:
            self.level = min(self.capacity, self.level + (now - self.at) * self.per_second)
            self.at = now

    def seconds_until(self, amount: float) -> float:
        """From the last refill, until ``amount`` is there (capped at a full bucket)."""
        return max(0.0, (min(amount, self.capacity) - self.level) / self.per_second)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A 429: which limit, for the client's error body and ``Retry-After``."""

    limit: str  # requests, tokens, in_flight, budget, queue
    message: str
    retry_after: float

    @property
    def quota(self) -> bool:
        """An exhausted budget: OpenAI's ``insufficient_quota``, not a rate limit."""
        return self.limit == "budget"


@dataclass(slots=True)
class TenantLimits:
    """One tenant's limits and their state on this gateway."""

    config: TenantSettings
    requests: Bucket | None = None
    tokens: Bucket | None = None
    in_flight: int = 0
    budget_start: float = 0.0  # the current period's start, epoch seconds
    budget_used: int = 0  # tokens answered in the period
    budget_held: int = 0  # estimates of requests in flight
    share_of: float = 1.0  # 1 / live gateways when each enforces its part alone

    @classmethod
    def of(cls, config: TenantSettings, now: float) -> TenantLimits:
        limits = cls(config)
        limits.configure(config, now)
        return limits

    def configure(self, config: TenantSettings, now: float) -> None:
        """New settings; what was used stays counted (a reload is no free refill)."""
        self.config = config
        self.requests = self._bucket(self.requests, config.requests_per_minute, now)
        self.tokens = self._bucket(self.tokens, config.tokens_per_minute, now)

    def _bucket(self, old: Bucket | None, limit: int, now: float) -> Bucket | None:
        if not limit:
            return None
        limit = max(1, math.floor(limit * self.share_of))
        if old is not None and old.capacity == limit:
            return old
        bucket = Bucket.per_minute(limit, now)
        if old is not None:
            bucket.level = min(bucket.level, old.level)
        return bucket

    def set_share(self, share: float, now: float) -> None:
        """Enforce ``share`` of each per minute limit (Redis unreachable in a cluster)."""
        if share != self.share_of:
            self.share_of = share
            self.requests = self._bucket(None, self.config.requests_per_minute, now)
            self.tokens = self._bucket(None, self.config.tokens_per_minute, now)

    def _period(self, wall: float) -> None:
        start = self.period_start(wall)
        if start != self.budget_start:
            self.budget_start, self.budget_used = start, 0

    @property
    def shared(self) -> bool:
        """Whether a cluster keeps this tenant's per minute limits and budget."""
        config = self.config
        return bool(config.requests_per_minute or config.tokens_per_minute or config.budget_tokens)

    def period_start(self, wall: float) -> float:
        length = period_seconds(self.config.budget_period)
        return wall - wall % length

    def refusal(self, limit: str, wait: float, wall: float) -> Refusal:
        """The 429 for ``limit``, saying what the limit is and when to try again."""
        config, name = self.config, self.config.name
        if limit == "in_flight":
            message = f"tenant {name!r} has {self.in_flight} requests in flight, its max_in_flight"
        elif limit == "budget":
            wait = self.period_start(wall) + period_seconds(config.budget_period) - wall
            message = (
                f"tenant {name!r} used its budget of {config.budget_tokens} tokens per "
                f"{config.budget_period}; it renews in {duration(wait)}"
            )
        else:
            per_minute = (
                config.requests_per_minute if limit == "requests" else config.tokens_per_minute
            )
            message = (
                f"tenant {name!r} reached its limit of {per_minute} {limit} per minute; "
                f"try again in {duration(wait)}"
            )
        return Refusal(limit, message, wait)

    def admit(self, estimate: int, now: float, wall: float) -> Refusal | None:
        """Take one request of about ``estimate`` tokens, or say which limit refuses it."""
        config = self.config
        if config.max_in_flight and self.in_flight >= config.max_in_flight:
            return self.refusal("in_flight", 1.0, wall)
        if config.budget_tokens:
            self._period(wall)
            if self.budget_used + self.budget_held >= config.budget_tokens:
                return self.refusal("budget", 0.0, wall)
        requests, tokens = self.requests, self.tokens
        if requests is not None:
            requests.refill(now)
            if requests.level < 1:
                return self.refusal("requests", requests.seconds_until(1), wall)
        if tokens is not None:
            tokens.refill(now)
            if tokens.level < min(estimate, tokens.capacity) or tokens.level <= 0:
                return self.refusal("tokens", tokens.seconds_until(max(1, estimate)), wall)
        if requests is not None:
            requests.level -= 1
        if tokens is not None:
            tokens.level -= estimate
        self.admitted(estimate)
        return None

    def admitted(self, estimate: int) -> None:
        """Count a request admitted (here, or by the cluster's shared limits)."""
        self.in_flight += 1
        self.budget_held += estimate if self.config.budget_tokens else 0

    def unadmitted(self, estimate: int) -> None:
        """Take back :meth:`admitted` (the cluster refused the request)."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.config.budget_tokens:
            self.budget_held = max(0, self.budget_held - estimate)

    def finish(
        self, estimate: int, used: int | None, now: float, wall: float, *, local: bool = True
    ) -> None:
        """A request ended; ``used`` is what its answer said (None: nothing was answered,
        and the estimate is given back). ``local``: this gateway's buckets admitted it."""
        self.in_flight = max(0, self.in_flight - 1)  # a tenant re-added by a reload
        if self.config.budget_tokens:
            self.budget_held = max(0, self.budget_held - estimate)
            self._period(wall)
            self.budget_used += used or 0
        if local and self.tokens is not None:
            self.tokens.refill(now)
            self.tokens.level -= (used or 0) - estimate

    def headers(
        self, requests_left: float | None = None, tokens_left: float | None = None
    ) -> dict[str, str]:
        """OpenAI's rate-limit headers, for every answer of a limited tenant: from this
        gateway's buckets, or from what the cluster's said (``*_left``)."""
        out: dict[str, str] = {}
        for kind, bucket, limit, left in (
            ("requests", self.requests, self.config.requests_per_minute, requests_left),
            ("tokens", self.tokens, self.config.tokens_per_minute, tokens_left),
        ):
            if not limit:
                continue
            if left is None and bucket is not None:
                left = bucket.level
            left = max(0.0, left or 0.0)
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(math.floor(left))
            out[f"x-ratelimit-reset-{kind}"] = duration((limit - left) * 60 / limit)
        return out
