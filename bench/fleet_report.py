"""What the routing benchmark measured, judged against its targets and written for people
(a table, bench/fleet_results.md) and for tools (bench/fleet_results.json)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import report as overhead_report
from fleet_load import Turn
from fleet_workloads import Targets
from loadgen import percentile

PEERS = ("nginx", "weighted", "adaptive", "oracle")
# The targets, each a ratio measured in the same run.
STAT_KEYS = ("cold_loads", "evictions", "prompt_tokens_evaluated", "prompt_tokens_cached")


@dataclass
class Peer:
    """One peer's run: its turns and what its emulated nodes counted meanwhile."""

    name: str
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0
    unfinished: int = 0  # turns the deadline cut off
    proxy_cpu_s: float | None = None  # user + system CPU of nginx or olmd during the load
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # name → stats delta
    skipped: str | None = None
    note: str = ""

    def total(self, key: str) -> int:
        return sum(int(n.get(key, 0)) for n in self.nodes.values())


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: after.get(k, 0) - before.get(k, 0) for k in STAT_KEYS}
    out["max_slots_in_use"] = after.get("max_slots_in_use", {})
    return out


def _ttfts(turns: list[Turn], follow_up: bool) -> list[float]:
    return [
        t.ttft_ms for t in turns if t.ok and t.ttft_ms is not None and (t.turn > 0) == follow_up
    ]


def summarize(peer: Peer) -> dict[str, Any]:
    """The numbers of one peer: TTFT percentiles, cache, loads, errors, stickiness."""
    if peer.skipped:
        return {"skipped": peer.skipped}
    turns = peer.turns
    follow, first = _ttfts(turns, True), _ttfts(turns, False)
    cached, evaluated = peer.total("prompt_tokens_cached"), peer.total("prompt_tokens_evaluated")
    by_user: dict[int, list[Turn]] = collections.defaultdict(list)
    for t in sorted(turns, key=lambda t: (t.user, t.turn)):
        by_user[t.user].append(t)
    same = moves = 0
    for conv in by_user.values():
        for prev, cur in itertools.pairwise(conv):
            if prev.node and cur.node:
                same += prev.node == cur.node
                moves += 1
    served: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for t in turns:
        served[t.node or "?"][t.model] += 1
    users_on: dict[str, set[int]] = collections.defaultdict(set)
    for t in turns:
        users_on[t.node or "?"].add(t.user)
    routes = collections.Counter(
        f"{'follow-up' if t.turn else 'first'}: {t.route}" for t in turns if t.route
    )
    errors = [t for t in turns if not t.ok]
    return {
        "followup_ttft_p50_ms": percentile(follow, 50),
        "followup_ttft_p95_ms": percentile(follow, 95),
        "first_ttft_p50_ms": percentile(first, 50),
        "first_ttft_p95_ms": percentile(first, 95),
        "cold_loads": peer.total("cold_loads"),
        "evictions": peer.total("evictions"),
        "prompt_tokens_cached": cached,
        "prompt_tokens_evaluated": evaluated,
        "cache_share": cached / (cached + evaluated) if cached + evaluated else 0.0,
        "wall_s": peer.wall_s,
        "proxy_cpu_ms_per_request": (
            None if peer.proxy_cpu_s is None else peer.proxy_cpu_s * 1000 / max(len(turns), 1)
        ),
        "requests": len(turns),
        "errors": len(errors) + peer.unfinished,
        "unfinished": peer.unfinished,
        "error_samples": sorted({t.error or "?" for t in errors})[:5],
        "same_node_followups": same / moves if moves else None,
        "requests_per_node": {n: dict(c) for n, c in sorted(served.items())},
        "users_per_node": {n: len(u) for n, u in sorted(users_on.items())},
        "route_reasons": dict(sorted(routes.items())),
        "nodes": peer.nodes,
    }


def evaluate(
    summaries: dict[str, dict[str, Any]], nodes: int, targets: Targets
) -> list[dict[str, Any]]:
    """Adaptive against nginx round-robin and against the oracle, from the same run, as
    the workload's ``targets`` ask."""
    out: list[dict[str, Any]] = []

    def add(target: str, goal: str, text: str, ok: bool | None) -> None:
        verdict = "not measured" if ok is None else ("met" if ok else "MISSED")
        out.append({"target": target, "goal": goal, "measured": text, "verdict": verdict})

    def measured(name: str) -> dict[str, Any] | None:
        s = summaries.get(name)
        return None if s is None or "skipped" in s else s

    def ratio(name: str, peer: dict[str, Any] | None, key: str, limit: float, goal: str) -> None:
        if peer is None or adaptive is None:
            add(f"vs {name}", goal, f"{name} not measured", None)
            return
        mine, theirs = adaptive[key], peer[key]
        value = mine / max(theirs, 1e-9)
        add(f"vs {name}", goal, f"{value:.2f}x ({mine:.0f} vs {theirs:.0f} ms)", value <= limit)

    adaptive, nginx, oracle = measured("adaptive"), measured("nginx"), measured("oracle")
    if adaptive is None:
        return out
    rr = targets.followup_vs_round_robin
    goal = f"follow-up TTFT p95 <= {rr:.2f}x nginx round-robin's"
    ratio("round-robin", nginx, "followup_ttft_p95_ms", rr, goal)
    if targets.followup_vs_oracle is not None:
        limit = targets.followup_vs_oracle
        goal = f"follow-up TTFT p95 <= {limit}x the oracle's"
        ratio("oracle", oracle, "followup_ttft_p95_ms", limit, goal)
    if targets.first_vs_oracle is not None:
        limit = targets.first_vs_oracle
        goal = f"first-turn TTFT p95 <= {limit}x the oracle's"
        ratio("oracle (first turns)", oracle, "first_ttft_p95_ms", limit, goal)
    if targets.cold_loads and oracle is not None:
        limit = oracle["cold_loads"] + nodes
        text = f"{adaptive['cold_loads']} (oracle {oracle['cold_loads']} + {nodes} nodes = {limit})"
        add(
            "cold loads",
            f"<= the oracle's + {nodes} (nodes)",
            text,
            adaptive["cold_loads"] <= limit,
        )
    errors = adaptive["errors"]
    add(
        "errors",
        "none",
        f"{errors} of {adaptive['requests'] + adaptive['unfinished']}",
        errors == 0,
    )
    return out


def _ms(*values: float) -> str:
    return " / ".join(f"{v:,.0f}" for v in values)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


ROWS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("follow-up TTFT p50 / p95 ms",
     lambda s: _ms(s["followup_ttft_p50_ms"], s["followup_ttft_p95_ms"])),
    ("first-turn TTFT p50 / p95 ms",
     lambda s: _ms(s["first_ttft_p50_ms"], s["first_ttft_p95_ms"])),
    ("cold loads / evictions", lambda s: f"{s['cold_loads']} / {s['evictions']}"),
    ("prompt tokens from cache", lambda s: f"{s['cache_share']:.1%}"),
    ("follow-ups on the previous turn's node", lambda s: _share(s["same_node_followups"])),
    ("wall time s", lambda s: f"{s['wall_s']:.1f}" + (" (cut)" if s["unfinished"] else "")),
    ("proxy CPU ms per request", lambda s: _number(s["proxy_cpu_ms_per_request"])),
    ("requests / errors", lambda s: f"{s['requests']} / {s['errors']}"),
)  # fmt: skip


def table_rows(summaries: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for label, fn in ROWS:
        cells = [
            "skipped" if "skipped" in summaries.get(p, {"skipped": 1}) else fn(summaries[p])
            for p in PEERS
        ]
        rows.append([label, *cells])
    return rows


def render_text(rows: list[list[str]]) -> str:
    return overhead_report.render_text(rows, PEERS)


def render_targets(targets: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{t['verdict']:>12}  {t['target']:<15}  adaptive {t['goal']}: {t['measured']}"
        for t in targets
    )


def observations(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Where each peer sent whom, and why olmd says it did: Markdown bullets."""
    out = []
    for name in PEERS:
        s = summaries.get(name, {"skipped": "not run"})
        if "skipped" in s:
            out.append(f"- **{name}**: skipped ({s['skipped']})")
            continue
        served = "; ".join(
            f"{node}: {s['users_per_node'].get(node, 0)} users, "
            + ", ".join(f"{m} x{c}" for m, c in sorted(models.items()))
            for node, models in s["requests_per_node"].items()
        )
        loads = ", ".join(f"{n} {d['cold_loads']}" for n, d in s["nodes"].items())
        out.append(f"- **{name}**: requests per node: {served}. Cold loads per node: {loads}.")
        if s["route_reasons"]:
            reasons = ", ".join(f"{k} x{v}" for k, v in s["route_reasons"].items())
            out.append(f"  - X-Olmd-Route: {reasons}")
        if s["error_samples"]:
            out.append(f"  - errors, e.g.: {'; '.join(s['error_samples'])}")
    return out


def render_markdown(
    meta: dict[str, Any], rows: list[list[str]], targets: list[dict[str, Any]], notes: list[str]
) -> str:
    return "\n".join(
        [
            "# olmd routing benchmark: latest results",
            "",
            f"Written by `bench/fleet.py` on {meta['date']}; every run overwrites this file "
            '(bench/README.md, section "The routing benchmark", explains the method).',
            "",
            "## Machine and run",
            "",
            *(f"- {key}: {value}" for key, value in meta.items() if key != "date"),
            "",
            "## Numbers",
            "",
            "| | " + " | ".join(PEERS) + " |",
            "|---|" + "---:|" * len(PEERS),
            *("| " + " | ".join(row) + " |" for row in rows),
            "",
            "TTFT: from sending the request to the first NDJSON line with content, on the "
            "client. Follow-ups are turns 2 and later. (cut): the peer's deadline ended the "
            "load; the turns it cut off count as errors and are not in the percentiles.",
            "",
            "## Targets (adaptive)",
            "",
            "| target | goal | measured | verdict |",
            "|---|---|---|---|",
            *(
                f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} |"
                for t in targets
            ),
            "",
            "## Where the requests went",
            "",
            *notes,
            "",
        ]
    )


def peer_json(peer: Peer, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "note": peer.note,
        "turns": [
            dataclasses.asdict(t) for t in sorted(peer.turns, key=lambda t: (t.user, t.turn))
        ],
    }


def render_summary(results: dict[str, dict[str, Any]]) -> str:
    """Every workload's table and targets in one page (bench/fleet_results.md)."""
    first = next(iter(results.values()))["meta"]
    lines = [
        "# olmd routing benchmark: latest results, every workload",
        "",
        f"Written by `bench/fleet.py` on {first['date']}; each workload's details are in "
        "bench/fleet/<workload>/fleet_results.md.",
        "",
        f"- machine: {first['machine']}",
        f"- pinning: {first['pinning']}",
        "",
    ]
    for result in results.values():
        meta = result["meta"]
        lines += [
            f"## {meta['workload']}",
            "",
            f"- {meta['performance model']}; {meta['olmd settings']}",
            f"- {meta['users']}; run: {meta['run']}",
            "",
            "| | " + " | ".join(PEERS) + " |",
            "|---|" + "---:|" * len(PEERS),
            *("| " + " | ".join(row) + " |" for row in result["rows"]),
            "",
            "| target (adaptive) | measured | |",
            "|---|---|---|",
            *(f"| {t['goal']} | {t['measured']} | {t['verdict']} |" for t in result["targets"]),
            "",
        ]
    return "\n".join(lines)
