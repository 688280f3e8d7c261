"""What the tenants benchmark measured, judged against its targets and written for people
(a table, bench/tenants_results.md) and for tools (bench/tenants_results.json)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleet_load import Turn
from loadgen import percentile
from report import render_text
from tenants_load import BatchRequest, Load, Workload

PEERS = ("nginx", "olmd", "tenants")
LABELS = {"nginx": "nginx", "olmd": "olmd, no tenants", "tenants": "olmd, two tenants"}
# The targets, each a ratio measured in the same run.
MAX_FLOOD_P95_VS_NGINX = 1 / 8
MIN_BATCH_RPS_VS_NGINX = 0.80
STAT_KEYS = ("completed", "rejected", "prompt_tokens_evaluated", "prompt_tokens_cached")


@dataclass
class Peer:
    """One peer's run: its load and what its emulated nodes counted meanwhile."""

    name: str
    load: Load = field(default_factory=Load)
    proxy_cpu_s: float | None = None  # user + system CPU of nginx or olmd during the load
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → stats delta
    skipped: str | None = None
    note: str = ""


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: after.get(k, 0) - before.get(k, 0) for k in STAT_KEYS}
    out["max_slots_in_use"] = after.get("max_slots_in_use", {})
    return out


def phase(turn: Turn, w: Workload) -> str:
    return "alone" if turn.sent_s < w.alone else "flood"


def batch_running(
    load: Load, span: tuple[float, float], batch_service: Callable[[BatchRequest], float]
) -> dict[str, float | None]:
    """Batch requests holding a slot, on average over ``span``: while no chat turn streams,
    and while one does. Estimated: a batch request holds its slot for the last
    ``batch_service(request)`` seconds before its answer (the emulators' performance
    model), a chat turn from its first token to its end."""
    events: list[tuple[float, int, int]] = []  # (time, batch change, chat change)
    for b in load.batch:
        if b.ok:
            events += [(b.done_s - batch_service(b), 1, 0), (b.done_s, -1, 0)]
    for t in load.chats:
        if t.ok and t.ttft_ms is not None:
            events += [(t.sent_s + t.ttft_ms / 1000, 0, 1), (t.sent_s + t.total_ms / 1000, 0, -1)]
    events.append((span[1], 0, 0))  # closes the last stretch
    time_in = {False: 0.0, True: 0.0}  # a chat turn streaming → seconds
    weighted = {False: 0.0, True: 0.0}  # a chat turn streaming → batch-seconds
    batch = chats = 0
    last = span[0]
    for at, db, dc in sorted(events):
        start, end = max(last, span[0]), min(at, span[1])
        if end > start:
            time_in[chats > 0] += end - start
            weighted[chats > 0] += batch * (end - start)
        last, batch, chats = at, batch + db, chats + dc
    return {
        "no_chat": weighted[False] / time_in[False] if time_in[False] else None,
        "chat": weighted[True] / time_in[True] if time_in[True] else None,
        "chat_share": time_in[True] / max(span[1] - span[0], 1e-9),
    }


def summarize(
    peer: Peer, w: Workload, batch_service: Callable[[BatchRequest], float]
) -> dict[str, Any]:
    """One peer's numbers: chat TTFT per phase, batch throughput, errors, placement."""
    if peer.skipped:
        return {"skipped": peer.skipped}
    chats, batch = peer.load.chats, peer.load.batch
    ttft: dict[str, list[float]] = {"alone": [], "flood": []}
    for t in chats:
        if t.ok and t.ttft_ms is not None:
            ttft[phase(t, w)].append(t.ttft_ms)
    start, stop = w.alone + w.warm_up, w.alone + w.flood
    steady = [b for b in batch if b.ok and start <= b.done_s <= stop]
    chat_errors = [t for t in chats if not t.ok]
    batch_errors = [b for b in batch if not b.ok]
    per_node: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for t in chats:
        per_node[t.node or "?"]["chat"] += 1
    for b in batch:
        per_node[b.node or "?"]["batch"] += 1
    routes = collections.Counter(f"{phase(t, w)}: {t.route}" for t in chats if t.route)
    requests = len(chats) + len(batch)
    return {
        "chat_alone_p50_ms": percentile(ttft["alone"], 50),
        "chat_alone_p95_ms": percentile(ttft["alone"], 95),
        "chat_flood_p50_ms": percentile(ttft["flood"], 50),
        "chat_flood_p95_ms": percentile(ttft["flood"], 95),
        "chat_turns_alone": len(ttft["alone"]),
        "chat_turns_flood": len(ttft["flood"]),
        "batch_rps": len(steady) / (stop - start),
        "batch_done": sum(b.ok for b in batch),
        "chat_errors": len(chat_errors) + peer.load.cut,
        "batch_errors": len(batch_errors),
        "errors": len(chat_errors) + peer.load.cut + len(batch_errors),
        "error_samples": sorted(
            {t.error or "?" for t in chat_errors} | {b.error or "?" for b in batch_errors}
        )[:5],
        "proxy_cpu_ms_per_request": (
            None if peer.proxy_cpu_s is None else peer.proxy_cpu_s * 1000 / max(requests, 1)
        ),
        "batch_running": batch_running(peer.load, (start, stop), batch_service),
        "requests_per_node": {n: dict(c) for n, c in sorted(per_node.items())},
        "chat_route_reasons": dict(sorted(routes.items())),
        "nodes": peer.nodes,
    }


def _measured(summaries: dict[str, dict[str, Any]], name: str) -> dict[str, Any] | None:
    s = summaries.get(name)
    return None if s is None or "skipped" in s else s


def _ratios(mine: dict[str, Any], nginx: dict[str, Any]) -> tuple[float, float]:
    p95 = mine["chat_flood_p95_ms"] / max(nginx["chat_flood_p95_ms"], 1e-9)
    rps = mine["batch_rps"] / max(nginx["batch_rps"], 1e-9)
    return p95, rps


def evaluate(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """olmd with tenants against nginx round-robin, from the same run; olmd without
    tenants alongside, for reference (it is what olmd does today)."""
    out: list[dict[str, Any]] = []
    nginx, olmd = _measured(summaries, "nginx"), _measured(summaries, "olmd")
    tenants = _measured(summaries, "tenants")

    def add(target: str, goal: str, subject: str, reference: str, ok: bool | None) -> None:
        verdict = "not measured" if ok is None else ("met" if ok else "MISSED")
        row = {"target": target, "goal": goal, "measured": subject, "reference": reference}
        out.append(row | {"verdict": verdict})

    def texts(s: dict[str, Any] | None) -> tuple[str, str, float | None, float | None]:
        if s is None:
            return "not run", "not run", None, None
        if nginx is None:
            return "nginx not measured", "nginx not measured", None, None
        p95, rps = _ratios(s, nginx)
        mine, theirs = s["chat_flood_p95_ms"], nginx["chat_flood_p95_ms"]
        ratio_text = f"1/{1 / p95:.1f}" if p95 > 0 else "0"
        return (
            f"{ratio_text} ({mine:,.0f} vs {theirs:,.0f} ms)",
            f"{rps:.1%} ({s['batch_rps']:.2f} vs {nginx['batch_rps']:.2f} req/s)",
            p95,
            rps,
        )

    p95_text, rps_text, p95, rps = texts(tenants)
    ref_p95, ref_rps, _, _ = texts(olmd)
    goal = f"chat TTFT p95 under the flood <= 1/{1 / MAX_FLOOD_P95_VS_NGINX:.0f} of nginx's"
    add(
        "chat under flood",
        goal,
        p95_text,
        ref_p95,
        None if p95 is None else p95 <= MAX_FLOOD_P95_VS_NGINX,
    )
    goal = f"batch req/s >= {MIN_BATCH_RPS_VS_NGINX:.0%} of nginx's"
    add(
        "batch throughput",
        goal,
        rps_text,
        ref_rps,
        None if rps is None else rps >= MIN_BATCH_RPS_VS_NGINX,
    )
    errors = None if tenants is None else tenants["errors"]
    add(
        "errors",
        "none",
        "not run" if tenants is None else f"{errors} ({tenants['chat_errors']} chat)",
        "not run" if olmd is None else str(olmd["errors"]),
        None if errors is None else errors == 0,
    )
    return out


# ---------------------------------------------------------------- rendering


def _ms(a: float, b: float) -> str:
    return f"{a:,.0f} / {b:,.0f}"


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[list[str]]:
    """[label, one cell per peer]."""
    specs: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        (
            "chat TTFT alone: p50 / p95 ms",
            lambda s: _ms(s["chat_alone_p50_ms"], s["chat_alone_p95_ms"]),
        ),
        (
            "chat TTFT under the flood: p50 / p95 ms",
            lambda s: _ms(s["chat_flood_p50_ms"], s["chat_flood_p95_ms"]),
        ),
        (
            "chat turns alone / under the flood",
            lambda s: f"{s['chat_turns_alone']} / {s['chat_turns_flood']}",
        ),
        ("batch req/s (after the warm-up)", lambda s: f"{s['batch_rps']:.2f}"),
        ("batch requests done", lambda s: str(s["batch_done"])),
        ("errors: chat / batch", lambda s: f"{s['chat_errors']} / {s['batch_errors']}"),
        (
            "proxy CPU per request, ms",
            lambda s: (
                "-"
                if s["proxy_cpu_ms_per_request"] is None
                else f"{s['proxy_cpu_ms_per_request']:.2f}"
            ),
        ),
    ]

    def cell(name: str, fn: Callable[[dict[str, Any]], str]) -> str:
        s = summaries.get(name)
        if s is None:
            return "not run"
        if "skipped" in s:
            return "skipped"
        return fn(s)

    return [[label, *(cell(name, fn) for name in PEERS)] for label, fn in specs]


def render_table(rows: list[list[str]]) -> str:
    return render_text(rows, [LABELS[p] for p in PEERS])


def render_targets(targets: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{t['verdict']:>12}  {t['target']:<16}  tenants {t['goal']}: {t['measured']}"
        f"   [no tenants: {t['reference']}]"
        for t in targets
    )


def observations(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Where each peer sent the two tenants' requests, and its errors: Markdown bullets."""
    out = []
    for name in PEERS:
        s = summaries.get(name, {"skipped": "not run"})
        if "skipped" in s:
            out.append(f"- **{LABELS[name]}**: skipped ({s['skipped']})")
            continue
        served = "; ".join(
            f"{node}: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
            for node, counts in s["requests_per_node"].items()
        )
        slots = ", ".join(
            f"{n} {max(d['max_slots_in_use'].values(), default=0)}" for n, d in s["nodes"].items()
        )
        out.append(
            f"- **{LABELS[name]}**: requests per node: {served}. Slots used at most: {slots}."
        )
        running = s["batch_running"]
        if running["no_chat"] is not None and running["chat"] is not None:
            out.append(
                f"  - batch requests in slots after the warm-up (estimated): "
                f"{running['no_chat']:.2f} on average while no chat turn streams, "
                f"{running['chat']:.2f} while one does ({running['chat_share']:.0%} of the time)"
            )
        if s["chat_route_reasons"]:
            reasons = ", ".join(f"{k} x{v}" for k, v in s["chat_route_reasons"].items())
            out.append(f"  - X-Olmd-Route of the chat turns: {reasons}")
        if s["error_samples"]:
            out.append(f"  - errors, e.g.: {'; '.join(s['error_samples'])}")
    return out


def render_markdown(
    meta: dict[str, Any], rows: list[list[str]], targets: list[dict[str, Any]], notes: list[str]
) -> str:
    return "\n".join(
        [
            "# olmd tenants benchmark: latest results",
            "",
            f"Written by `bench/tenants.py` on {meta['date']}; every run overwrites this file "
            '(bench/README.md, section "The tenants benchmark", explains the method).',
            "",
            "## Machine and run",
            "",
            *(f"- {key}: {value}" for key, value in meta.items() if key != "date"),
            "",
            "## Numbers",
            "",
            "| | " + " | ".join(LABELS[p] for p in PEERS) + " |",
            "|---|" + "---:|" * len(PEERS),
            *("| " + " | ".join(row) + " |" for row in rows),
            "",
            "TTFT: from sending a chat turn to the first NDJSON line with content, on the "
            "client; a turn belongs to the phase in which it was sent. Batch req/s: batch "
            "answers completed between the end of the warm-up and the end of the flood, per "
            "second. Errors: non-200 answers, streams without `done`, timeouts, and chat "
            "turns the hard deadline cut off.",
            "",
            "## Targets (olmd with two tenants, against nginx round-robin)",
            "",
            "| target | goal | olmd, two tenants | verdict | olmd, no tenants (reference) |",
            "|---|---|---|---|---|",
            *(
                f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} | "
                f"{t['reference']} |"
                for t in targets
            ),
            "",
            "## Where the requests went",
            "",
            *notes,
            "",
        ]
    )


def peer_json(peer: Peer, summary: dict[str, Any], w: Workload) -> dict[str, Any]:
    def turn(t: Turn) -> dict[str, Any]:
        return dataclasses.asdict(t) | {"phase": phase(t, w)}

    def request(b: BatchRequest) -> dict[str, Any]:
        return dataclasses.asdict(b)

    return {
        "summary": summary,
        "note": peer.note,
        "chats": [turn(t) for t in sorted(peer.load.chats, key=lambda t: t.sent_s)],
        "batch": [request(b) for b in sorted(peer.load.batch, key=lambda b: b.sent_s)],
    }
