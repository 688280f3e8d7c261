"""Tenancy as the gateway uses it: who a key belongs to, whether a tenant may send this
request now, and what it used once answered.

``admit`` runs before a request waits for a slot and either refuses it (a :class:`Refusal`,
answered 429) or hands back a :class:`Ticket` that travels with the request: its fair
:class:`Share` for the queue, the ``x-ratelimit-*`` headers for the answer, and the counts
its answer fills in. ``finish`` gives the ticket back: usage, metrics, the access log.

Without ``[[tenants]]``, keys or a tenant header, every request is the tenant ``default``
with no limits, and the gateway skips all of this (``enabled`` is False).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.ports import SharedQuota
from daemon.sections import period_seconds
from daemon.settings import DEFAULT_TENANT, Settings, TenantSettings
from daemon.tenancy.fair import Share
from daemon.tenancy.keys import KeyDirectory, load_directory
from daemon.tenancy.limits import Refusal, TenantLimits
from daemon.tenancy.usage import UsageBook, day_of, merge_days

__all__ = ["Refusal", "Tenancy", "Ticket"]

_NO_SHARE = Share("")
log = get_logger("olmd.tenancy")


@dataclass(eq=False, slots=True)
class Ticket:
    """One admitted request, from admission to its answer's end."""

    tenant: str
    model: str
    estimate: int
    share: Share
    headers: dict[str, str]
    started: float
    queue_wait: float = 0.0
    prompt_tokens: int | None = None  # None: the answer said nothing of its tokens
    completion_tokens: int = 0
    cached_tokens: int = 0
    gpu_seconds: float = 0.0
    node: str = ""
    route: str = ""
    ttft: float | None = None
    by_cluster: bool = False  # admitted by the cluster's shared limits, settled there


@dataclass(slots=True)
class _Tenant:
    config: TenantSettings
    share: Share
    limits: TenantLimits
    allowed: dict[str, bool] = field(default_factory=dict)  # model → may use (memo)


class Tenancy:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.clock = clock
        self.wall = wall
        self.tenants: dict[str, _Tenant] = {}
        self.book = UsageBook()
        self.shared: SharedQuota | None = None  # with a cluster: limits and usage in Redis
        self._access: IO[str] | None = None
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Take new settings (start-up, SIGHUP); KeysFileError leaves the old ones."""
        directory = load_directory(settings.tenant_keys(), settings.server.keys_file)
        now = self.clock()
        configs = {t.name: t for t in settings.tenants}
        configs.setdefault(DEFAULT_TENANT, TenantSettings(name=DEFAULT_TENANT))
        tenants: dict[str, _Tenant] = {}
        for name, config in configs.items():
            old = self.tenants.get(name)
            share = Share.of(name, config.priority, config.weight, config.queue_limit)
            if old is not None:
                old.limits.configure(config, now)  # what was used stays counted
                limits = old.limits
            else:
                limits = TenantLimits.of(config, now)
                used = self.book.budgets.get(name)
                if used is not None:
                    limits.budget_start, limits.budget_used = used
            tenants[name] = _Tenant(config, share, limits)
        self.directory: KeyDirectory = directory
        self.tenants = tenants
        self.settings = settings
        # A keys file makes keys required, even with no key left in it (all revoked).
        self.keys_required = bool(len(directory) or settings.server.keys_file)
        self.enabled = bool(settings.tenants or self.keys_required or settings.server.tenant_header)
        self.trusted = tuple(
            ipaddress.ip_network(p, strict=False) for p in settings.server.trusted_proxies
        )
        self.record_path: Path = settings.usage.record
        self._open_access_log(settings.usage.access_log)

    def _open_access_log(self, path: str) -> None:
        current = getattr(self._access, "name", None)
        if path == (current or ""):
            return
        if self._access is not None:
            self._access.close()
            self._access = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._access = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        if self._access is not None:
            self._access.close()
            self._access = None

    # -- who is asking ------------------------------------------------------------------

    def tenant_of_key(self, key: bytes) -> str | None:
        return self.directory.tenant_of(key)

    def known(self, tenant: str) -> bool:
        return tenant in self.tenants

    def unrestricted(self, tenant: str) -> bool:
        entry = self.tenants.get(tenant)
        return entry is not None and "*" in entry.config.models

    def allows(self, tenant: str, model: str) -> bool:
        """Whether ``tenant`` may use ``model`` (its ``models``: names or globs)."""
        entry = self.tenants.get(tenant)
        if entry is None:
            return False
        allowed = entry.allowed.get(model)
        if allowed is None:
            patterns = entry.config.models
            allowed = any(fnmatch.fnmatchcase(model, p) for p in patterns) or any(
                fnmatch.fnmatchcase(model, f"{p}:latest") for p in patterns if ":" not in p
            )
            if len(entry.allowed) < 10_000:
                entry.allowed[model] = allowed
        return allowed

    # -- admission ----------------------------------------------------------------------

    async def admit(self, tenant: str, model: str, estimate: int) -> Ticket | Refusal:
        """Admit a request of about ``estimate`` tokens, or the refusal (429)."""
        entry = self.tenants[tenant]
        limits = entry.limits
        now, wall = self.clock(), self.wall()
        if limits.tokens is not None:  # a huge body must not empty the bucket for minutes
            estimate = min(estimate, limits.config.tokens_per_minute)
        shared = self.shared
        refusal: Refusal | None = None
        headers: dict[str, str] | None = None
        by_cluster = False
        if shared is not None and limits.shared:
            config = limits.config
            if config.max_in_flight and limits.in_flight >= config.max_in_flight:
                refusal = limits.refusal("in_flight", 1.0, wall)
            else:
                limits.admitted(estimate)  # counted before the await: others see it
                answer = await shared.take(config, estimate, limits.period_start(wall))
                if answer is None or answer.refused is not None:
                    limits.unadmitted(estimate)
                if answer is None:  # Redis is down: this gateway's share, alone
                    limits.set_share(1 / max(1, shared.gateways), now)
                elif answer.refused is not None:
                    refusal = limits.refusal(answer.refused, answer.wait, wall)
                else:
                    by_cluster = True
                    headers = limits.headers(answer.requests_left, answer.tokens_left)
                if answer is not None:
                    limits.set_share(1.0, now)
        if headers is None and refusal is None:
            refusal = limits.admit(estimate, now, wall)
            headers = limits.headers()
        if refusal is not None:
            self.refused(tenant, model, refusal)
            return refusal
        self.metrics.tenant_in_flight.labels(tenant).inc()
        ticket = Ticket(tenant, model, estimate, entry.share, headers or {}, now)
        ticket.by_cluster = by_cluster
        return ticket

    def headers(self, tenant: str) -> dict[str, str]:
        """The rate-limit headers of ``tenant`` now (for a refusal)."""
        entry = self.tenants.get(tenant)
        return entry.limits.headers() if entry is not None else {}

    def refused(self, tenant: str, model: str, refusal: Refusal | None = None) -> None:
        """A request answered before admission: 429 for ``refusal``, else 404 (a model
        the tenant may not use). Counted and logged like the others."""
        status = 404 if refusal is None else 429
        if refusal is not None:
            self.metrics.tenant_rate_limited.labels(tenant, refusal.limit).inc()
        self.metrics.tenant_requests.labels(tenant, model, str(status)).inc()
        wall = self.wall()
        self.book.add(wall, tenant, model, UsageBook.counts(status))
        if self._access is not None:
            now = self.clock()
            self._log_access(Ticket(tenant, model, 0, _NO_SHARE, {}, now), status, wall, now)

    def finish(self, ticket: Ticket, status: int) -> None:
        """The request ended with ``status``: count what its answer used."""
        entry = self.tenants.get(ticket.tenant)
        now, wall = self.clock(), self.wall()
        answered = ticket.prompt_tokens is not None
        used = (ticket.prompt_tokens or 0) + ticket.completion_tokens if answered else None
        if used is None and status < 300:
            used = ticket.estimate  # an answer without counts: its estimate stands
        if entry is not None:
            limits = entry.limits
            # Settled where it was admitted: this gateway's buckets, or the cluster's. A
            # failed answer gives its estimate back.
            limits.finish(ticket.estimate, used, now, wall, local=not ticket.by_cluster)
            if limits.config.budget_tokens:
                self.book.budgets[ticket.tenant] = (limits.budget_start, limits.budget_used)
            if ticket.by_cluster and self.shared is not None:
                delta = (used or 0) - ticket.estimate
                self.shared.settle(limits.config, delta, used or 0, limits.period_start(wall))
        tenant, model, m = ticket.tenant, ticket.model, self.metrics
        m.tenant_in_flight.labels(tenant).dec()
        m.tenant_requests.labels(tenant, model, str(status)).inc()
        m.tenant_queue_wait.labels(tenant).observe(ticket.queue_wait)
        prompt, completion = ticket.prompt_tokens or 0, ticket.completion_tokens
        if prompt:
            m.tenant_tokens.labels(tenant, model, "prompt").inc(prompt)
        if ticket.cached_tokens:
            m.tenant_tokens.labels(tenant, model, "cached").inc(ticket.cached_tokens)
        if completion:
            m.tenant_tokens.labels(tenant, model, "completion").inc(completion)
        if ticket.gpu_seconds:
            m.tenant_gpu_seconds.labels(tenant, model).inc(ticket.gpu_seconds)
        counts = UsageBook.counts(
            status,
            prompt_tokens=prompt,
            cached_prompt_tokens=ticket.cached_tokens,
            completion_tokens=completion,
            gpu_seconds=ticket.gpu_seconds,
            queue_wait_seconds=ticket.queue_wait,
        )
        self.book.add(wall, tenant, model, counts)
        if self._access is not None:
            self._log_access(ticket, status, wall, now)

    def _log_access(self, ticket: Ticket, status: int, wall: float, now: float) -> None:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall)),
            "tenant": ticket.tenant,
            "model": ticket.model,
            "node": ticket.node or None,
            "route": ticket.route or None,
            "status": status,
            "ttft_seconds": round(ticket.ttft, 4) if ticket.ttft is not None else None,
            "queue_wait_seconds": round(ticket.queue_wait, 4),
            "prompt_tokens": ticket.prompt_tokens,
            "completion_tokens": ticket.completion_tokens,
            "duration_seconds": round(now - ticket.started, 4),
        }
        try:
            assert self._access is not None
            self._access.write(json.dumps(line) + "\n")
        except OSError as exc:  # a full disk must not fail requests
            log.warning("access_log_failed", error=str(exc))

    # -- the record ---------------------------------------------------------------------

    def load_record(self) -> None:
        """Read the usage record (start-up): budgets continue where they stopped."""
        self.book = UsageBook.load(self.record_path)
        for name, (start, used) in self.book.budgets.items():
            entry = self.tenants.get(name)
            if entry is not None:
                entry.limits.budget_start, entry.limits.budget_used = start, used

    def save_record(self) -> None:
        if self.book.dirty:
            self.book.prune(day_of(self.wall()), self.settings.usage.days_kept)
            self.book.save(self.record_path)

    async def flush_shared(self) -> None:
        """Send usage and settled answers to the cluster (every flush while one is on)."""
        if self.shared is None:
            return
        pending = self.book.take_pending()
        periods = {n: period_seconds(e.config.budget_period) for n, e in self.tenants.items()}
        sent = False
        try:
            sent = await self.shared.flush(pending, periods)
        finally:  # also when cancelled at stop: the counts wait for the next flush
            if not sent:
                self.book.restore_pending(pending)

    async def shared_days(self, since: str) -> dict[str, Any] | None:
        """Every gateway's usage from ``since`` (a cluster's, from Redis); None without a
        cluster or while Redis does not answer."""
        shared = self.shared
        if shared is None:
            return None
        today = dt.date.fromisoformat(day_of(self.wall()))
        start = min(dt.date.fromisoformat(since), today)
        count = min((today - start).days + 1, self.settings.usage.days_kept)
        wanted = [(today - dt.timedelta(days=i)).isoformat() for i in range(count)]
        rows = await shared.usage_rows(wanted)
        return merge_days(rows) if rows is not None else None

    def view(
        self,
        since: str,
        tenant: str | None,
        queued: dict[str, int],
        days: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``/admin/usage``: each tenant's settings, state now and usage since ``since``;
        ``days``: the cluster's usage (see :meth:`shared_days`), else this gateway's."""
        used = self.book.summary(since, tenant, days)
        out = []
        for name, entry in sorted(self.tenants.items()):
            if tenant is not None and name != tenant:
                continue
            config, limits = entry.config, entry.limits
            out.append(
                {
                    "tenant": name,
                    "priority": config.priority,
                    "weight": config.weight,
                    "models": config.models,
                    "keys": self.directory.tenants().get(name, 0),
                    "limits": {
                        "requests_per_minute": config.requests_per_minute or None,
                        "tokens_per_minute": config.tokens_per_minute or None,
                        "max_in_flight": config.max_in_flight or None,
                        "queue_limit": config.queue_limit or None,
                        "budget_tokens": config.budget_tokens or None,
                        "budget_period": config.budget_period if config.budget_tokens else None,
                    },
                    "budget_used": limits.budget_used if config.budget_tokens else None,
                    "in_flight": limits.in_flight,
                    "queued": queued.get(name, 0),
                    "usage": used.pop(name, {"totals": {}, "models": {}}),
                }
            )
        # Tenants in the record that the settings no longer name keep their history.
        out.extend(
            {"tenant": name, "removed": True, "usage": usage} for name, usage in used.items()
        )
        view: dict[str, Any] = {"since": since, "counted_by": "this gateway", "tenants": out}
        if days is not None:
            view["counted_by"] = "every gateway"
        elif self.shared is not None:
            view["note"] = (
                "Redis does not answer: this gateway's own counts, and each limit enforced "
                f"as its share alone (1/{self.shared.gateways})"
            )
        return view
