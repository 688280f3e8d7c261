"""The status page at ``/ui``: the fleet table, the teams (with tenancy on), each node's
time to first token and request rate over the last minutes, the sync's progress and the
last manifest.

``GET /ui`` is the page (rendered here, kept live by its script), ``GET /ui/status.json``
the view it polls, composed from the admin views (``/admin/nodes``, ``/admin/sync``).
Who may see it is the guard's business (see guard.py): the admin token, or loopback
while none is set. ``/ui/login`` trades the token for a session cookie, from a form
(``POST``) or once from the address (``GET /ui/login?token=...``, for a bookmark or a
headless browser; the token then sits in that browser's history).

The charts come from :class:`History`: every ``STEP`` seconds a sampler reads the
request counter and the measured time-to-first-token histogram (``daemon.metrics``) per
node and keeps the differences for ``WINDOW`` seconds. Time to first token is measured
for requests a cost-aware strategy (``adaptive``) routed; under a classic strategy the
chart says there is no data. Each chart comes with its scale: gridlines at round values
of its unit (ms or s, req/s) and the time axis in minutes.

The teams' table is ``/admin/usage`` for today (UTC) with each tenant's queue wait over
the charts' window, from the tenant queue wait histogram the sampler also keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from daemon import __version__
from daemon.gateway import views
from daemon.gateway.admin import nodes_view, sync_view, usage_view
from daemon.gateway.component import GATEWAY
from daemon.gateway.guard import (
    UI_COOKIE,
    UI_SESSION_SECONDS,
    is_loopback,
    token_matches,
    ui_allowed,
    ui_session,
)
from daemon.gateway.tenants import TENANCY
from daemon.gateway.ui_page import LOGIN_CSP, PAGE_CSP, plot, render_login, render_page
from daemon.gateway.views import Waits
from daemon.gateway.wire import json_error
from daemon.logs import get_logger
from daemon.metrics import Metrics
from daemon.runtime import RUNTIME

__all__ = [
    "HISTORY",
    "STEP",
    "WINDOW",
    "History",
    "add_routes",
    "metric_totals",
    "page_view",
    "queue_waits",
]

log = get_logger("olmd.ui")

STEP = 5.0  # seconds between samples
WINDOW = 900.0  # seconds the charts cover

Totals = tuple[float, float, float]  # requests, sum and count of measured TTFT
Point = tuple[float, float, float | None]  # when, requests per second, mean TTFT


class History:
    """Per node: requests per second and mean time to first token, one point per sample,
    for the last ``window`` seconds. ``sample`` is fed cumulative totals and keeps the
    differences; a node's first totals are counted from zero (its counters started
    there), except at the very first sample, which only sets the baseline."""

    def __init__(
        self,
        step: float = STEP,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.step, self.window = step, window
        self.clock = clock  # the sampler's and the charts' time (tests set a fake one)
        self._points: dict[str, deque[Point]] = {}
        self._last: dict[str, Totals] = {}
        self._at: float | None = None
        self._waits: deque[tuple[float, Waits]] = deque(maxlen=int(window / step) + 1)

    def sample(self, now: float, totals: Mapping[str, Totals], nodes: Iterable[str] = ()) -> None:
        if self._at is not None:
            elapsed = now - self._at
            if elapsed <= 0:
                return
            for node in {*nodes, *totals}:
                requests, ttft_sum, ttft_count = totals.get(node, (0.0, 0.0, 0.0))
                before = self._last.get(node, (0.0, 0.0, 0.0))
                done = ttft_count - before[2]
                ttft = (ttft_sum - before[1]) / done if done > 0 else None
                rate = max(0.0, requests - before[0]) / elapsed
                keep = int(self.window / self.step) + 1
                self._points.setdefault(node, deque(maxlen=keep)).append((now, rate, ttft))
        self._last, self._at = dict(totals), now

    def series(self, node: str) -> list[Point]:
        return list(self._points.get(node, ()))

    def sample_waits(self, now: float, waits: Waits) -> None:
        """The tenants' cumulative queue waits now (their difference is the window's)."""
        self._waits.append((now, waits))

    def waits_since(self) -> Waits:
        """The oldest reading inside the window; none (counted from start) before one."""
        start = self.clock() - self.window
        return next((w for at, w in self._waits if at >= start), {})


HISTORY = web.AppKey("olmd_ui_history", History)


def metric_totals(metrics: Metrics) -> dict[str, Totals]:
    """Per node: requests answered so far, and the sum and count of measured TTFT."""
    out: dict[str, list[float]] = {}
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total"):
                out.setdefault(s.labels["node"], [0.0, 0.0, 0.0])[0] += s.value
    for family in metrics.ttft_measured.collect():
        for s in family.samples:
            row = out.setdefault(s.labels.get("node", ""), [0.0, 0.0, 0.0])
            if s.name.endswith("_sum"):
                row[1] += s.value
            elif s.name.endswith("_count"):
                row[2] += s.value
    return {node: (r[0], r[1], r[2]) for node, r in out.items() if node}


def _node_names(app: web.Application) -> list[str]:
    return [node.name for node in app[GATEWAY].fleet] if GATEWAY in app else []


def take_sample(app: web.Application) -> None:
    """One sample of every node into the app's history (the sampler's tick)."""
    history, metrics = app[HISTORY], app[RUNTIME].metrics
    now = history.clock()
    history.sample(now, metric_totals(metrics), _node_names(app))
    history.sample_waits(now, queue_waits(metrics))


async def _sampler(app: web.Application) -> None:
    history = app[HISTORY]
    while True:
        try:
            take_sample(app)
        except Exception:  # a chart must never take the daemon down
            log.exception("ui.sample_failed")
        await asyncio.sleep(history.step)


async def history_context(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the sampler task, cancelled and awaited on the way out."""
    task = asyncio.create_task(_sampler(app), name="olmd-ui-history")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------- the charts


def _chart(node: str, series: list[Point], now: float, window: float) -> dict[str, Any]:
    start = now - window
    rates = [(at, rate) for at, rate, _ in series]
    ttfts = [(at, ttft) for at, _, ttft in series]
    last_rate = f"{rates[-1][1]:.2f} req/s" if rates else "no data yet"
    seen = [t for _, t in ttfts if t is not None]
    last_ttft = "no data" if not seen else views.duration(seen[-1])
    # Seconds when the slowest point is a second or more, else milliseconds.
    scale, unit = (1.0, "s") if max(seen, default=0.0) >= 1 else (1000.0, "ms")
    ttfts = [(at, None if t is None else t * scale) for at, t in ttfts]
    return {
        "node": node,
        "ttft": plot("time to first token", unit, ttfts, start, window, last_ttft),
        "rate": plot("requests", "req/s", rates, start, window, last_rate),
    }


# ---------------------------------------------------------------- the teams


def queue_waits(metrics: Metrics) -> Waits:
    """Per tenant: the queue wait histogram's cumulative buckets, sum and count."""
    rows: dict[str, tuple[dict[float, float], list[float]]] = {}
    for family in metrics.tenant_queue_wait.collect():
        for s in family.samples:
            buckets, totals = rows.setdefault(s.labels["tenant"], ({}, [0.0, 0.0]))
            if s.name.endswith("_bucket"):
                buckets[float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                totals[0] = s.value
            elif s.name.endswith("_count"):
                totals[1] = s.value
    return {tenant: (tuple(sorted(b.items())), t[0], t[1]) for tenant, (b, t) in rows.items()}


def _teams(app: web.Application, history: History) -> dict[str, Any] | None:
    tenancy = app.get(TENANCY)
    if tenancy is None or not tenancy.enabled:
        return None
    view = usage_view(app, f"{datetime.now(UTC).date():%Y-%m-%d}", None)
    now, before = queue_waits(app[RUNTIME].metrics), history.waits_since()
    return {
        "columns": views.TENANT_COLUMNS,
        "rows": [
            {
                "key": entry["tenant"],
                "cells": views.tenant_cells(entry, views.queue_wait(now, before, entry["tenant"])),
            }
            for entry in view["tenants"]
        ],
    }


# ---------------------------------------------------------------- the view


def page_view(app: web.Application) -> dict[str, Any]:
    """What the page shows, as strings ready to put in place (the script does only that)."""
    fleet, sync = nodes_view(app), sync_view(app)
    history = app[HISTORY]
    moment = history.clock()
    states = [n["state"] for n in fleet["nodes"]]
    counted = ", ".join(f"{states.count(s)} {s}" for s in dict.fromkeys(states))
    panic = (
        "panic routing: too few healthy nodes hold a model, so requests go to every node "
        "that holds it"
        if fleet["panic"]
        else ""
    )
    return {
        "title": "olmd status",
        "summary": f"olmd {__version__} · strategy {fleet['strategy']} · "
        f"{len(states)} node(s): {counted or 'none'} · {fleet['queued']} request(s) queued",
        "panic": panic,
        "updated": f"{datetime.now(UTC):%H:%M:%S} UTC",
        "minutes": int(history.window // 60),
        "columns": views.NODE_COLUMNS,
        "nodes": [
            {"key": n["name"], "cls": f"state-{n['state']}", "cells": views.node_cells(n)}
            for n in fleet["nodes"]
        ],
        "teams": _teams(app, history),
        "charts": [
            _chart(n["name"], history.series(n["name"]), moment, history.window)
            for n in fleet["nodes"]
        ],
        "manifest_columns": views.MANIFEST_COLUMNS,
        "sync": {
            "lines": views.sync_lines(sync),
            "pulls": views.pulls(sync),
            "manifest": views.manifest_rows(sync)
            or [["none written yet", *[""] * (len(views.MANIFEST_COLUMNS) - 1)]],
        },
    }


# ---------------------------------------------------------------- handlers

_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _html(text: str, csp: str, status: int = 200) -> web.Response:
    headers = {**_HEADERS, "Content-Security-Policy": csp}
    return web.Response(text=text, content_type="text/html", status=status, headers=headers)


def _not_ready(app: web.Application) -> web.Response | None:
    return None if GATEWAY in app else json_error(503, "olmd is starting")


async def page(request: web.Request) -> web.Response:
    return _not_ready(request.app) or _html(render_page(page_view(request.app)), PAGE_CSP)


async def status_json(request: web.Request) -> web.Response:
    refusal = _not_ready(request.app)
    if refusal is not None:
        return refusal
    return web.json_response(page_view(request.app), headers=_HEADERS)


def _logged_in(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    response = web.Response(status=303, headers={"Location": "/ui", **_HEADERS})
    if runtime.admin_token is not None:
        response.set_cookie(
            UI_COOKIE,
            ui_session(runtime.admin_token),
            max_age=UI_SESSION_SECONDS,
            path="/ui",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
    return response


async def _login(request: web.Request, token: str | None) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.admin_token is None:  # loopback only, no token to ask for
        if is_loopback(request):
            return web.Response(status=303, headers={"Location": "/ui"})
        return json_error(403, "the status page answers on loopback only: set OLMD_ADMIN_TOKEN")
    if token is not None:
        if token_matches(token, runtime):
            return _logged_in(request)
        log.warning("ui.login_refused", peer=request.remote)
        return _html(render_login("That is not the admin token."), LOGIN_CSP, status=401)
    if ui_allowed(request, runtime):
        return web.Response(status=303, headers={"Location": "/ui"})
    return _html(render_login(), LOGIN_CSP)


async def login_form(request: web.Request) -> web.Response:
    return await _login(request, request.query.get("token"))


async def login_post(request: web.Request) -> web.Response:
    form = await request.post()
    token = form.get("token")
    return await _login(request, token if isinstance(token, str) else "")


async def logout(request: web.Request) -> web.Response:
    response = web.Response(status=303, headers={"Location": "/ui/login", **_HEADERS})
    response.del_cookie(UI_COOKIE, path="/ui")
    return response


def add_routes(app: web.Application) -> None:
    """The page's routes, and its history sampler as a cleanup context."""
    app[HISTORY] = History()
    app.cleanup_ctx.append(history_context)
    app.router.add_get("/ui", page)
    app.router.add_get("/ui/status.json", status_json)
    app.router.add_get("/ui/login", login_form)
    app.router.add_post("/ui/login", login_post)
    app.router.add_get("/ui/logout", logout)
