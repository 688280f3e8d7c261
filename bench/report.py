"""What the benchmark measured, judged against the targets and written for people
(a table, bench/results.md) and for tools (bench/results.json)."""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from loadgen import PostResult, StreamResult

COLUMNS = ("direct", "nginx", "aiohttp", "olmd")
POST_CONCURRENCY = (1, 32)
STREAM_CONCURRENCY = (1, 64)

# The targets, each a ratio measured in the same run.
MAX_ADDED_P50_MS = 0.5
MIN_RPS_VS_NGINX = 0.75
MIN_CHUNKS_VS_DIRECT = 0.90
MAX_RSS_MB = 60.0

R = TypeVar("R", PostResult, StreamResult)


@dataclass
class Column:
    """Everything measured through one target, one entry per round."""

    url: str
    post: dict[int, list[PostResult]] = field(default_factory=dict)
    stream: dict[int, list[StreamResult]] = field(default_factory=dict)
    cpu_us_per_request: list[float] = field(default_factory=list)  # non-stream, top concurrency
    cpu_share_post: list[float] = field(default_factory=list)  # of its core, same run
    cpu_share_stream: list[float] = field(default_factory=list)  # streams, top concurrency
    rss_idle_mb: float | None = None
    rss_max_mb: float | None = None
    nodes_seen: list[str] = field(default_factory=list)


def median_of(results: list[R]) -> R:
    """Field by field: the median of each number over the rounds, errors summed."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(results[0]):
        xs = [getattr(r, f.name) for r in results]
        if f.name == "errors":
            values[f.name] = sum(xs)
        elif isinstance(xs[0], int | float) and not isinstance(xs[0], bool):
            values[f.name] = statistics.median(xs)
        else:
            values[f.name] = xs[0]
    return dataclasses.replace(results[0], **values)


Pick = Callable[[list[Any]], Any]


def evaluate(columns: dict[str, Column], name: str, pick: Pick = median_of) -> list[dict[str, Any]]:
    """The four targets for column ``name`` (olmd, or the bare aiohttp reference).

    ``pick`` chooses among the rounds: the median, or one round (``lambda xs: xs[i]``).
    """
    subject, direct, nginx = columns.get(name), columns.get("direct"), columns.get("nginx")
    out: list[dict[str, Any]] = []

    def add(target: str, goal: str, value: float | None, text: str, ok: bool | None) -> None:
        verdict = "not measured" if ok is None else ("pass" if ok else "MISS")
        row = {"target": target, "goal": goal, "value": value, "measured": text}
        out.append(row | {"verdict": verdict})

    if subject is None or direct is None:
        return out
    top_post, top_stream = POST_CONCURRENCY[-1], STREAM_CONCURRENCY[-1]

    p50, base = pick(subject.post[1]).p50_ms, pick(direct.post[1]).p50_ms
    added = p50 - base
    text = f"{added:+.3f} ms ({p50:.3f} vs direct {base:.3f})"
    goal = f"adds <= {MAX_ADDED_P50_MS} ms at p50, c=1, non-streaming"
    add("latency", goal, added, text, added <= MAX_ADDED_P50_MS)

    goal = f"req/s at c={top_post} >= {MIN_RPS_VS_NGINX:.0%} of nginx"
    if nginx is None:
        add("throughput", goal, None, "nginx not installed", None)
    else:
        ratio = pick(subject.post[top_post]).rps / max(pick(nginx.post[top_post]).rps, 1e-9)
        add("throughput", goal, ratio, f"{ratio:.1%}", ratio >= MIN_RPS_VS_NGINX)

    mine, theirs = pick(subject.stream[top_stream]), pick(direct.stream[top_stream])
    ratio = mine.chunks_per_s / max(theirs.chunks_per_s, 1e-9)
    goal = f"chunks/s at c={top_stream} >= {MIN_CHUNKS_VS_DIRECT:.0%} of direct"
    add("streaming", goal, ratio, f"{ratio:.1%}", ratio >= MIN_CHUNKS_VS_DIRECT)

    if subject.rss_max_mb is not None:
        rss = subject.rss_max_mb
        goal = f"RSS <= {MAX_RSS_MB:.0f} MB under load"
        add("memory", goal, rss, f"{rss:.1f} MB", rss <= MAX_RSS_MB)
    return out


def column_json(column: Column) -> dict[str, Any]:
    """One column for results.json: every round, and the medians."""
    return {
        "url": column.url,
        "non_streaming": {
            str(c): {
                "median": dataclasses.asdict(median_of(rs)),
                "rounds": [dataclasses.asdict(r) for r in rs],
            }
            for c, rs in column.post.items()
        },
        "streaming": {
            str(c): {
                "median": dataclasses.asdict(median_of(rs)),
                "rounds": [dataclasses.asdict(r) for r in rs],
            }
            for c, rs in column.stream.items()
        },
        "cpu_us_per_request": column.cpu_us_per_request,
        "cpu_share_post": column.cpu_share_post,
        "cpu_share_stream": column.cpu_share_stream,
        "rss_idle_mb": column.rss_idle_mb,
        "rss_max_mb": column.rss_max_mb,
        "nodes_seen": column.nodes_seen,
    }


# ---------------------------------------------------------------- the table


def _fmt(*values: float | None, digits: int = 3) -> str:
    return " / ".join("-" if v is None else f"{v:.{digits}f}" for v in values)


def _post(k: Column, c: int) -> PostResult:
    return median_of(k.post[c])


def _stream(k: Column, c: int) -> StreamResult:
    return median_of(k.stream[c])


def _errors(k: Column) -> str:
    return str(sum(_post(k, c).errors for c in k.post))


def _streams(k: Column) -> str:
    done = sum(_stream(k, c).streams for c in k.stream)
    return f"{done:.0f} / {sum(_stream(k, c).errors for c in k.stream)}"


def _cpu(k: Column) -> str:
    post, stream = statistics.median(k.cpu_share_post), statistics.median(k.cpu_share_stream)
    return f"{post:.0%} / {stream:.0%}"


def table_rows(columns: dict[str, Column], ideal_chunks: float | None) -> list[list[str]]:
    """[label, one cell per column]; medians over the rounds."""
    top_post, top_stream = POST_CONCURRENCY[-1], STREAM_CONCURRENCY[-1]
    specs: list[tuple[str, Callable[[Column], str]]] = []
    for c in POST_CONCURRENCY:
        specs.append((f"non-stream c={c}: req/s", lambda k, c=c: f"{_post(k, c).rps:,.0f}"))
        specs.append(
            (
                f"non-stream c={c}: p50 / p90 / p99 ms",
                lambda k, c=c: _fmt(_post(k, c).p50_ms, _post(k, c).p90_ms, _post(k, c).p99_ms),
            )
        )
    specs.append(("non-stream: errors", _errors))
    for c in STREAM_CONCURRENCY:
        ideal = f" (ideal {ideal_chunks:,.0f})" if ideal_chunks and c > 1 else ""
        specs.append(
            (
                f"stream c={c}: TTFB p50 / p99 ms",
                lambda k, c=c: _fmt(_stream(k, c).ttfb_p50_ms, _stream(k, c).ttfb_p99_ms),
            )
        )
        specs.append(
            (f"stream c={c}: chunks/s{ideal}", lambda k, c=c: f"{_stream(k, c).chunks_per_s:,.0f}")
        )
    specs += [
        ("stream: streams done / errors", _streams),
        (
            f"proxy CPU per request, non-stream c={top_post}, µs",
            lambda k: f"{statistics.median(k.cpu_us_per_request):.0f}",
        ),
        (f"proxy core busy, non-stream c={top_post} / stream c={top_stream}", _cpu),
        (
            "RSS idle / max under load, MB",
            lambda k: _fmt(k.rss_idle_mb, k.rss_max_mb, digits=1) if k.rss_max_mb else "-",
        ),
    ]

    def cell(name: str, fn: Callable[[Column], str]) -> str:
        column = columns.get(name)
        if column is None:
            return "skipped"
        try:
            return fn(column)
        except (KeyError, IndexError, TypeError, statistics.StatisticsError):
            return "-"

    return [[label, *(cell(name, fn) for name in COLUMNS)] for label, fn in specs]


def render_text(rows: list[list[str]], columns: Sequence[str] = COLUMNS) -> str:
    """Rows under a heading of ``columns``, as aligned plain text."""
    table = [["", *columns], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _reference(target: dict[str, Any], reference: list[dict[str, Any]]) -> str:
    other = next((t for t in reference if t["target"] == target["target"]), None)
    return f"{other['measured']}, {other['verdict']}" if other else "-"


def render_targets(targets: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{t['verdict']:>12}  {t['target']:<10}  olmd {t['goal']}: {t['measured']}"
        f"   [bare aiohttp: {_reference(t, reference)}]"
        for t in targets
    )


def render_tables(
    rows: list[list[str]],
    targets: list[dict[str, Any]],
    reference: list[dict[str, Any]],
    per_round: list[list[dict[str, Any]]],
    level: str = "##",
) -> list[str]:
    """The numbers and the targets as Markdown lines (results.md and the README)."""
    out = [
        f"{level} Numbers (median of {len(per_round)} round(s))",
        "",
        "| | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "`aiohttp` is bench/bare_proxy.py, a bare aiohttp pass-through on uvloop: the floor "
        "for a Python proxy on this machine.",
        "",
        f"{level} Targets (olmd)",
        "",
        "| target | goal | olmd | verdict | bare aiohttp (reference) |",
        "|---|---|---|---|---|",
        *(
            f"| {t['target']} | {t['goal']} | {t['measured']} | {t['verdict']} | "
            f"{_reference(t, reference)} |"
            for t in targets
        ),
        "",
    ]
    if len(per_round) > 1:
        out += ["Per round (olmd):", ""]
        for i, t in enumerate(targets):
            values = [r[i]["measured"] for r in per_round if len(r) > i]
            out.append(f"- {t['target']}: " + "; ".join(values))
        out.append("")
    return out


def render_markdown(
    meta: dict[str, Any],
    tables: list[str],
    profiles: dict[str, str],
) -> str:
    out = [
        "# olmd proxy benchmark: latest results",
        "",
        f"Written by `bench/run.py` on {meta['date']}; every run overwrites this file "
        "(bench/README.md explains the method).",
        "",
        "## Machine and run",
        "",
        *(f"- {key}: {value}" for key, value in meta.items() if key != "date"),
        "",
        *tables,
    ]
    for kind, summary in profiles.items():
        out += [f"## Profile of olmd under {kind} load (py-spy)", "", "```", summary, "```", ""]
    return "\n".join(out)


README_START = "<!-- bench/run.py results: start -->"
README_END = "<!-- bench/run.py results: end -->"


def update_readme(path: Path, meta: dict[str, Any], tables: list[str]) -> bool:
    """Replace the results between the README's markers; False if it has none."""
    text = path.read_text() if path.exists() else ""
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        return False
    section = [
        "",
        f"Run of {meta['date']}: {meta['machine']}; {meta['other load on the machine']}. "
        "Details, and py-spy profiles when run with `--profile`: [results.md](results.md).",
        "",
        *tables,
    ]
    path.write_text(head + start + "\n".join(section) + end + tail)
    return True


# ---------------------------------------------------------------- profiles


def summarize_profile(path: Path, top: int = 15) -> str:
    """Self time per frame, and inclusive time per olmd function, from py-spy's raw stacks."""
    if not path.exists():
        return "(no profile written)"
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in {f.rpartition(":")[0] for f in frames if "daemon/" in f or "plugins/" in f}:
            inclusive[frame + ")"] += n
    if not total:
        return "(empty profile)"
    lines = [f"{total} samples; self time (time in uvloop's C code shows as Runner.run):"]
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines.append("inclusive time of olmd's functions:")
    lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in inclusive.most_common(top + 10)]
    return "\n".join(lines)
