"""What an operator reads: the fleet table, the sync's lines and the teams' table, from
the admin views' JSON (``GET /admin/nodes``, ``GET /admin/sync``, ``GET /admin/usage``).
The status page and the CLI both show these, so they never disagree about what a column
means.

Pure functions of plain JSON data: no I/O, no clock (ages come in as given).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

__all__ = [
    "MANIFEST_COLUMNS",
    "NODE_COLUMNS",
    "TENANT_COLUMNS",
    "cache_lines",
    "duration",
    "human_bytes",
    "manifest_rows",
    "node_cells",
    "pulls",
    "queue_wait",
    "short_time",
    "sync_lines",
    "table",
    "tenant_cells",
    "tenant_limits",
]

NODE_COLUMNS = (
    "NAME",
    "STATE",
    "WEIGHT",
    "SLOTS",
    "MODELS",
    "LOADED",
    "EJECTIONS",
    "COOLDOWN",
    "PROBED",
    "LAST ERROR",
)
MANIFEST_COLUMNS = ("NODE", "REACHABLE", "OLLAMA", "MODELS", "STATUSES", "NOT OK")
TENANT_COLUMNS = (
    "TENANT",
    "PRIORITY",
    "IN FLIGHT",
    "QUEUED",
    "REQUESTS TODAY",
    "TOKENS TODAY",
    "429S TODAY",
    "QUEUE WAIT, 15 MIN",
    "LIMITS",
)

Json = Mapping[str, Any]
Buckets = tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last
Waits = dict[str, tuple[Buckets, float, float]]  # tenant → queue wait buckets, sum, count


def human_bytes(count: float) -> str:
    """Decimal units, as Ollama prints sizes."""
    if count < 1000:
        return f"{int(count)} B"
    size = float(count)
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000:
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} TB"


def short_time(text: str | None) -> str:
    """An ISO instant as ``2026-12-01 03:00 +0800`` (in its own zone); "-" for none."""
    if not text:
        return "-"
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return text
    offset = at.utcoffset()
    zone = "" if offset is None else " UTC" if not offset else f" {at:%z}"
    return f"{at:%Y-%m-%d %H:%M}{zone}"


def _seconds(value: float) -> str:
    if value < 90:
        return f"{value:.0f}s"
    if value < 5400:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def node_cells(node: Json) -> list[str]:
    """One row of the fleet table, in ``NODE_COLUMNS`` order."""
    slots = node.get("slots") or node.get("parallel") or 0
    in_use: Mapping[str, int] = node.get("slots_in_use") or {}
    used = ", ".join(f"{model} {n}/{slots}" for model, n in in_use.items()) or f"0/{slots}"
    cooldown = float(node.get("cooldown_seconds") or 0)
    age = node.get("last_probe_age_seconds")
    return [
        str(node.get("name", "?")),
        str(node.get("state", "?")),
        str(node.get("weight", "")),
        used,
        str(len(node.get("models") or ())),
        ", ".join(node.get("loaded") or ()) or "-",
        str(node.get("ejections", 0)),
        _seconds(cooldown) if cooldown > 0 else "-",
        "never" if age is None else f"{_seconds(float(age))} ago",
        " ".join(str(node.get("last_error") or "-").split()),
    ]


def duration(seconds: float) -> str:
    """``0.42 ms`` under 10 ms (two digits), ``420 ms`` under a second, ``2.35 s`` from one."""
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1000:.2g} ms" if 0 < seconds < 0.01 else f"{seconds * 1000:.0f} ms"


def queue_wait(now: Waits, before: Waits, tenant: str) -> str:
    """A tenant's queue wait between two readings of its histogram: the p95 (interpolated
    within its bucket, as Prometheus' histogram_quantile does; "under" the lowest bound
    when it falls below it, "over" the highest beyond it) and the mean; "-" without
    requests."""
    buckets, total, count = now.get(tenant, ((), 0.0, 0.0))
    old_buckets, old_total, old_count = before.get(tenant, ((), 0.0, 0.0))
    done = count - old_count
    if done <= 0:
        return "-"
    old = dict(old_buckets)
    rank, below, lower, p95 = 0.95 * done, 0.0, 0.0, ""
    for upper, cumulative in buckets:
        seen = cumulative - old.get(upper, 0.0)
        if math.isinf(upper):
            p95 = f"over {duration(lower)}"
            break
        if seen >= rank:
            if not lower:
                p95 = f"under {duration(upper)}"
            else:
                p95 = duration(lower + (upper - lower) * (rank - below) / max(seen - below, 1e-9))
            break
        below, lower = seen, upper
    return f"p95 {p95}, mean {duration((total - old_total) / done)}"


def tenant_limits(entry: Json) -> str:
    """A tenant's limits and budget in one phrase (``"30 req/min, 8 at once"``)."""
    limits: Json = entry.get("limits") or {}
    parts = [
        f"{limits[key]:,} {label}"
        for key, label in (
            ("requests_per_minute", "req/min"),
            ("tokens_per_minute", "tok/min"),
            ("max_in_flight", "at once"),
        )
        if limits.get(key)
    ]
    if limits.get("budget_tokens"):
        budget = f"budget {limits['budget_tokens']:,}/{limits.get('budget_period')}"
        if entry.get("budget_used") is not None:
            budget += f" (used {entry['budget_used']:,})"
        parts.append(budget)
    return ", ".join(parts) or "none"


def _of(count: Any, limit: Any) -> str:
    return f"{count}/{limit}" if limit else str(count)


def tenant_cells(entry: Json, wait: str) -> list[str]:
    """One row of the teams' table, in ``TENANT_COLUMNS`` order, for one tenant of
    ``/admin/usage`` (usage since today); ``wait`` is its queue wait, formatted."""
    totals: Json = (entry.get("usage") or {}).get("totals") or {}
    tokens = int(totals.get("prompt_tokens", 0)) + int(totals.get("completion_tokens", 0))
    counts = [
        f"{int(totals.get('requests', 0)):,}",
        f"{tokens:,}",
        f"{int(totals.get('rate_limited', 0)):,}",
    ]
    if entry.get("removed"):
        return [f"{entry.get('tenant')} (removed)", "-", "-", "-", *counts, wait, "-"]
    limits: Json = entry.get("limits") or {}
    weight = float(entry.get("weight") or 1)
    priority = str(entry.get("priority", "-"))
    return [
        str(entry.get("tenant")),
        priority if weight == 1 else f"{priority}, weight {weight:g}",
        _of(entry.get("in_flight", 0), limits.get("max_in_flight")),
        _of(entry.get("queued", 0), limits.get("queue_limit")),
        *counts,
        wait,
        tenant_limits(entry),
    ]


def _pull_items(sync: Json) -> list[tuple[str, str, Json]]:
    progress = sync.get("progress") or {}
    return [
        (node, model, item)
        for node, models in (progress.get("nodes") or {}).items()
        for model, item in models.items()
        if item.get("action") == "pull"
    ]


def pulls(sync: Json | None) -> list[dict[str, Any]]:
    """The running sync's pulls that are under way or waiting to retry: a label, bytes
    done and in all (0 while unknown) and a line of text."""
    if not sync or not sync.get("running"):
        return []
    out = []
    for node, model, item in _pull_items(sync):
        state = item.get("state")
        done, total = int(item.get("completed") or 0), int(item.get("total") or 0)
        if state == "pulling":
            amount = (
                f"{done * 100 // total}% {human_bytes(done)}/{human_bytes(total)}"
                if total
                else str(item.get("status") or "starting")
            )
            text = f"attempt {item.get('attempt', 1)}: {amount}"
        elif state == "waiting":
            text = f"waiting to retry: {' '.join(str(item.get('error') or '').split())[:100]}"
        else:
            continue
        out.append({"label": f"{node} {model}", "done": done, "total": total, "text": text})
    return out


def _run_line(sync: Json) -> str:
    items = _pull_items(sync)
    states = [item.get("state") for _, _, item in items]
    phase = (sync.get("progress") or {}).get("phase", "starting")
    counts = [
        f"{states.count('done')}/{len(items)} pulls done",
        *(
            f"{states.count(s)} {word}"
            for s, word in (("pulling", "pulling"), ("waiting", "waiting to retry"))
            if s in states
        ),
    ]
    queued = states.count("queued")
    if queued:
        counts.append(f"{queued} waiting for a slot")
    unreachable = {
        node
        for node, models in (sync.get("progress") or {}).get("nodes", {}).items()
        if any(item.get("action") == "unreachable" for item in models.values())
    }
    if unreachable:
        counts.append(f"unreachable: {', '.join(sorted(unreachable))}")
    return f"sync running ({sync.get('trigger') or 'api'}): {phase}, {', '.join(counts)}"


def _last_run_line(state: Json) -> str:
    outcome = state.get("last_outcome")
    if outcome is None:
        return "last run: none recorded"
    when = short_time(state.get("last_finished_at") or state.get("last_started_at"))
    verb = "finished" if state.get("last_finished_at") else "started"
    line = f"last run: {outcome}, {verb} {when}"
    error = state.get("last_error")
    if error and outcome != "running":
        line += f" ({' '.join(str(error).split())[:120]})"
    return line


def _schedule_line(schedule: Json) -> str:
    window = schedule.get("window", "?")
    if schedule.get("window_open"):
        where = f"window {window} open until {short_time(schedule.get('window_closes'))}"
    else:
        where = f"window {window} closed, opens {short_time(schedule.get('next_window_opens'))}"
    if not schedule.get("enabled"):
        return f"nightly sync off; {where}"
    return (
        f"nightly at '{schedule.get('cron')}', next {short_time(schedule.get('next_run'))}; {where}"
    )


def _manifest_line(manifest: Json | None) -> str:
    if manifest is None:
        return "manifest: none written yet"
    if manifest.get("error"):
        return f"manifest: {manifest.get('path')}: {manifest['error']}"
    nodes: Sequence[Json] = manifest.get("nodes") or ()
    stale = sum(1 for n in nodes if n.get("stale"))
    drift = len(manifest.get("drift") or ())
    return (
        f"manifest: {manifest.get('path')}, written {short_time(manifest.get('generated_at'))}, "
        f"{len(nodes)} node(s){f' ({stale} stale)' if stale else ''}, "
        f"{drift} model(s) with digest drift"
    )


def sync_lines(sync: Json | None) -> list[str]:
    """The sync's state in a few lines: the run (if one is going), the last run, the
    schedule and window, the manifest."""
    if sync is None:
        return ["this daemon runs no model sync"]
    lines = [_run_line(sync)] if sync.get("running") else ["sync idle"]
    lines.append(_last_run_line(sync.get("state") or {}))
    if sync.get("schedule"):
        lines.append(_schedule_line(sync["schedule"]))
    lines.append(_manifest_line(sync.get("manifest")))
    lines += cache_lines(sync.get("cache"))
    return lines


def _gb(count: object) -> str:
    return f"{(count if isinstance(count, int) else 0) / 1e9:.2f} GB"


def cache_lines(cache: Json | None) -> list[str]:
    """Gateway mode: olmd's blob cache, its models and the downloads under way."""
    if not cache:
        return []
    models = cache.get("models") or []
    lines = [
        f"cache: {len(models)} model(s), {_gb(cache.get('cache_bytes'))} of "
        f"{_gb(cache.get('max_cache_bytes'))} in {cache.get('cache_dir')} (from "
        f"{cache.get('registry')}; nodes pull from {cache.get('advertise_url')})"
    ]
    for model in models:
        lines.append(f"cached {model['name']} {str(model['digest'])[7:19]} {_gb(model['size'])}")
    for name, done in (cache.get("downloading") or {}).items():
        total = done.get("total") or 0
        share = f"{100 * done.get('completed', 0) / total:.0f}%" if total else "starting"
        lines.append(f"downloading {name} into the cache: {share} of {_gb(total)}")
    return lines


def manifest_rows(sync: Json | None) -> list[list[str]]:
    """The last manifest, a row per node, in ``MANIFEST_COLUMNS`` order."""
    manifest = (sync or {}).get("manifest") or {}
    rows = []
    for node in manifest.get("nodes") or ():
        reachable = "yes" if node.get("reachable") else "no"
        if node.get("stale"):
            reachable = f"no (stale, confirmed {short_time(node.get('last_confirmed'))})"
        statuses = node.get("statuses") or {}
        rows.append(
            [
                str(node.get("name")),
                reachable,
                str(node.get("ollama_version") or "-"),
                str(node.get("models", 0)),
                ", ".join(f"{n} {s}" for s, n in statuses.items()) or "-",
                ", ".join(node.get("failed") or ()) or "-",
            ]
        )
    return rows


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, gap: int = 3) -> list[str]:
    """Columns padded to their widest cell, as ``kubectl get`` prints them."""
    every = [list(header), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in every) for i in range(len(header))]
    return [
        (" " * gap).join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in every
    ]
