"""The status page's HTML: one document with its style and a small script inline, no
framework, nothing fetched from anywhere but olmd itself (it works offline).

The server renders the page from the view (see :func:`daemon.gateway.ui.page_view`); the
script fetches the same view as JSON every few seconds and puts its strings into the
same elements, so every number is formatted once, in Python. The Content-Security-Policy
allows exactly this style and this script (by hash) and requests to olmd alone.
"""

from __future__ import annotations

import base64
import hashlib
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

__all__ = [
    "CHART_HEIGHT",
    "CHART_WIDTH",
    "LOGIN_CSP",
    "PAGE_CSP",
    "POLL_SECONDS",
    "nice_scale",
    "plot",
    "render_login",
    "render_page",
]

POLL_SECONDS = 2.0

# A chart's box in SVG units (CSS pixels): the plot, with room on the left for the value
# axis and below for the time axis.
CHART_WIDTH, CHART_HEIGHT = 320, 124
_LEFT, _RIGHT, _TOP, _BOTTOM = 44, 10, 8, 22
_PLOT_W, _PLOT_H = CHART_WIDTH - _LEFT - _RIGHT, CHART_HEIGHT - _TOP - _BOTTOM


def nice_scale(top: float) -> tuple[float, float]:
    """A round top for a value axis and its step (1, 2, 2.5 or 5 times a power of ten),
    at most four steps up to it; an axis over nothing is 0 to 1."""
    if top <= 0:
        return 1.0, 0.25
    raw = top / 4
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    return step * math.ceil(top / step - 1e-9), step


def _number(value: float) -> str:
    return f"{round(value, 6):g}"


def plot(
    title: str,
    unit: str,
    points: Sequence[tuple[float, float | None]],
    start: float,
    window: float,
    label: str,
) -> dict[str, Any]:
    """One chart, ready to draw: its line, gridlines with their values (in ``unit``),
    the time axis, and the latest value as ``label``. ``points`` are in ``unit``."""
    top, step = nice_scale(max((v for _, v in points if v is not None), default=0.0))
    y = [
        {"at": round(_TOP + _PLOT_H * (1 - i * step / top), 1), "text": _number(i * step)}
        for i in range(round(top / step) + 1)
    ]
    minutes = window / 60
    every = 5 if minutes >= 10 else 1 if minutes >= 2 else minutes / 2
    agos = sorted({minutes, *(k * every for k in range(int(minutes // every) + 1))}, reverse=True)
    x = [
        {
            "at": round(_LEFT + _PLOT_W * (1 - ago / minutes), 1),
            "text": "now" if ago <= 0 else f"-{_number(ago)} min",
            "anchor": "start" if ago == minutes else "end" if ago <= 0 else "middle",
        }
        for ago in agos
    ]
    out, pen = [], "M"
    for at, value in points:
        if value is None:
            pen = "M"
            continue
        px = _LEFT + _PLOT_W * min(max((at - start) / window, 0.0), 1.0)
        out.append(f"{pen}{px:.1f},{_TOP + _PLOT_H * (1 - value / top):.1f}")
        pen = "L"
    return {
        "title": title,
        "unit": unit,
        "label": label,
        "d": " ".join(out),
        "empty": "" if out else "no data yet" if not points else "no data",
        "y": y,
        "x": x,
    }


_STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e;
  --muted: #6e7781; --line: #d0d7de; --axis: #8c959f; --ink: #424a53; --series: #0969da; }
@media (prefers-color-scheme: dark) { :root { --muted: #8b949e; --line: #30363d;
  --axis: #6e7681; --ink: #c9d1d9; --series: #58a6ff; } }
[hidden] { display: none !important; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5rem 2rem; }
h1 { font-size: 1.3rem; margin: 0 0 .2rem; } h2 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
.muted { color: var(--muted); }
.banner { padding: .4rem .7rem; border-left: 4px solid var(--warn); margin: .6rem 0; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-size: .75rem; letter-spacing: .04em; color: var(--muted); }
td { font-variant-numeric: tabular-nums; }
tr.state-healthy td:nth-child(2) { color: var(--ok); }
tr.state-cooling td:nth-child(2) { color: var(--warn); }
tr.state-down td:nth-child(2) { color: var(--bad); font-weight: 600; }
tr.state-draining td:nth-child(2) { color: var(--muted); }
#charts { display: flex; flex-wrap: wrap; gap: 1rem; }
.chart { margin: 0; padding: .5rem .8rem .6rem; border: 1px solid var(--line);
  border-radius: 6px; }
.chart figcaption { font-weight: 600; margin-bottom: .2rem; }
.plot { margin: .35rem 0 .1rem; }
.plot-head { display: flex; justify-content: space-between; gap: 1rem; font-size: .85rem; }
.plot-head b { font-weight: 600; font-variant-numeric: tabular-nums; }
.plot svg { display: block; overflow: visible; }
.plot .grid { stroke: var(--line); stroke-width: 1; }
.plot .axis { stroke: var(--axis); stroke-width: 1; }
.plot .line { fill: none; stroke: var(--series); stroke-width: 2.25; stroke-linejoin: round;
  stroke-linecap: round; }
.plot .tick { fill: var(--ink); font-size: 11px; font-variant-numeric: tabular-nums; }
.plot .tick.start { text-anchor: start; } .plot .tick.middle { text-anchor: middle; }
.plot .tick.end { text-anchor: end; }
.plot .empty { fill: var(--muted); font-size: 12px; text-anchor: middle; }
ul { padding-left: 1.2rem; } #pulls li { display: flex; gap: .7rem; align-items: center; }
progress { width: 12rem; }
form { display: flex; gap: .5rem; margin-top: 1rem; } input { min-width: 20rem; }
"""

_SCRIPT = """
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const [W, H, L, RIGHT, TOP, BASE] = GEOMETRY; // a chart's box, its plot's edges
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  const rows = (id, list, attr = "node") => $(id).replaceChildren(...list.map((r) => {
    const tr = el("tr", undefined, r.cls);
    if (r.key) tr.dataset[attr] = r.key;
    for (const c of r.cells) tr.append(el("td", c));
    return tr;
  }));
  const probe = el("div");
  probe.innerHTML = "<svg></svg>";
  const SVG_NS = probe.firstChild.namespaceURI; // from the parser: no address in this page
  const svg = (tag, attrs, text) => {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, a] of Object.entries(attrs)) e.setAttribute(k, String(a));
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const plot = (s) => {
    const box = el("div", undefined, "plot");
    const head = el("div", undefined, "plot-head");
    head.append(el("span", `${s.title} (${s.unit})`), el("b", s.label));
    const frame = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": `${s.title} in ${s.unit}, latest ${s.label}` });
    for (const t of s.y) {
      frame.append(svg("line", { class: "grid", x1: L, x2: RIGHT, y1: t.at, y2: t.at }),
        svg("text", { class: "tick end", x: L - 6, y: t.at + 4 }, t.text));
    }
    for (const t of s.x) {
      frame.append(svg("text", { class: `tick ${t.anchor}`, x: t.at, y: H - 6 }, t.text));
    }
    frame.append(svg("line", { class: "axis", x1: L, x2: L, y1: TOP, y2: BASE }),
      svg("line", { class: "axis", x1: L, x2: RIGHT, y1: BASE, y2: BASE }));
    if (s.d) frame.append(svg("path", { class: "line", d: s.d }));
    if (s.empty) {
      const middle = { class: "empty", x: (L + RIGHT) / 2, y: (TOP + BASE) / 2 };
      frame.append(svg("text", middle, s.empty));
    }
    box.append(head, frame);
    return box;
  };
  const apply = (v) => {
    $("summary").textContent = v.summary;
    $("panic").textContent = v.panic;
    $("panic").hidden = !v.panic;
    $("updated").textContent = v.updated;
    rows("nodes", v.nodes);
    $("teams-section").hidden = !v.teams;
    if (v.teams) {
      const head = el("tr");
      for (const c of v.teams.columns) head.append(el("th", c));
      $("teams-head").replaceChildren(head);
      rows("teams", v.teams.rows, "tenant");
    }
    $("charts").replaceChildren(...v.charts.map((c) => {
      const f = el("figure", undefined, "chart");
      f.dataset.node = c.node;
      f.append(el("figcaption", c.node), plot(c.ttft), plot(c.rate));
      return f;
    }));
    $("sync-lines").replaceChildren(...v.sync.lines.map((t) => el("li", t)));
    $("pulls").replaceChildren(...v.sync.pulls.map((p) => {
      const li = el("li");
      const bar = el("progress");
      if (p.total) { bar.max = p.total; bar.value = p.done; }
      li.append(el("span", p.label), bar, el("span", p.text));
      return li;
    }));
    rows("manifest", v.sync.manifest.map((cells) => ({ cells })));
  };
  let polls = 0;
  const poll = async () => {
    try {
      const r = await fetch("/ui/status.json", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) { location.assign("/ui/login"); return; }
      if (!r.ok) throw new Error(String(r.status));
      apply(await r.json());
      document.body.dataset.polls = String(++polls);
      $("offline").hidden = true;
    } catch (e) {
      $("offline").hidden = false;
    }
  };
  poll();
  setInterval(poll, POLL_MS);
})();
"""
_GEOMETRY = [CHART_WIDTH, CHART_HEIGHT, _LEFT, CHART_WIDTH - _RIGHT, _TOP, CHART_HEIGHT - _BOTTOM]
_SCRIPT = _SCRIPT.replace("POLL_MS", str(int(POLL_SECONDS * 1000))).replace(
    "GEOMETRY", str(_GEOMETRY)
)


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_COMMON_CSP = (
    "default-src 'none'; connect-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
PAGE_CSP = f"{_COMMON_CSP}; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}"
LOGIN_CSP = f"{_COMMON_CSP}; style-src {_hash(_STYLE)}"


def _rows(rows: Sequence[Mapping[str, Any]], attr: str = "node") -> str:
    out = []
    for row in rows:
        cls = f' class="{escape(row["cls"])}"' if row.get("cls") else ""
        key = f' data-{attr}="{escape(row["key"])}"' if row.get("key") else ""
        cells = "".join(f"<td>{escape(c)}</td>" for c in row["cells"])
        out.append(f"<tr{cls}{key}>{cells}</tr>")
    return "".join(out)


def _head(columns: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"


def _plot(s: Mapping[str, Any]) -> str:
    """One chart as the script draws it: gridlines with their values, the time axis,
    the axes, the line (or why there is none)."""
    w, h, left, right, top, base = _GEOMETRY
    parts = []
    for t in s["y"]:
        at = t["at"]
        parts.append(
            f'<line class="grid" x1="{left}" x2="{right}" y1="{at}" y2="{at}"></line>'
            f'<text class="tick end" x="{left - 6}" y="{at + 4:g}">{escape(t["text"])}</text>'
        )
    for t in s["x"]:
        parts.append(
            f'<text class="tick {escape(t["anchor"])}" x="{t["at"]}" y="{h - 6}">'
            f"{escape(t['text'])}</text>"
        )
    parts.append(
        f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{base}"></line>'
        f'<line class="axis" x1="{left}" x2="{right}" y1="{base}" y2="{base}"></line>'
    )
    if s["d"]:
        parts.append(f'<path class="line" d="{escape(s["d"])}"></path>')
    if s["empty"]:
        parts.append(
            f'<text class="empty" x="{(left + right) / 2:g}" y="{(top + base) / 2:g}">'
            f"{escape(s['empty'])}</text>"
        )
    title, unit, label = escape(s["title"]), escape(s["unit"]), escape(s["label"])
    return (
        f'<div class="plot"><div class="plot-head"><span>{title} ({unit})</span>'
        f"<b>{label}</b></div>"
        f'<svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="{title} in {unit}, latest {label}">{"".join(parts)}</svg></div>'
    )


def _chart(chart: Mapping[str, Any]) -> str:
    return (
        f'<figure class="chart" data-node="{escape(chart["node"])}">'
        f"<figcaption>{escape(chart['node'])}</figcaption>"
        f"{_plot(chart['ttft'])}{_plot(chart['rate'])}</figure>"
    )


def _teams(teams: Mapping[str, Any] | None, minutes: int) -> str:
    hidden = "" if teams else " hidden"
    columns = teams["columns"] if teams else ()
    rows = _rows(teams["rows"], "tenant") if teams else ""
    return (
        f'<section id="teams-section"{hidden}><h2>Teams</h2>'
        f'<p class="muted">Requests, tokens and 429s since 00:00 UTC; queue wait over the '
        f"last {minutes} minutes.</p>"
        f'<table><thead id="teams-head">{_head(columns)}</thead><tbody id="teams">{rows}</tbody>'
        "</table></section>"
    )


def _pull(pull: Mapping[str, Any]) -> str:
    bar = (
        f'<progress max="{int(pull["total"])}" value="{int(pull["done"])}"></progress>'
        if pull["total"]
        else "<progress></progress>"
    )
    return f"<li><span>{escape(pull['label'])}</span>{bar}<span>{escape(pull['text'])}</span></li>"


def _document(title: str, body: str, script: str = "") -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{body}{f'<script>{script}</script>' if script else ''}</body></html>"
    )


def render_page(view: Mapping[str, Any]) -> str:
    """The whole page for ``view`` (the JSON the script polls)."""
    sync = view["sync"]
    lines = "".join(f"<li>{escape(line)}</li>" for line in sync["lines"])
    manifest = [{"cells": cells} for cells in sync["manifest"]]
    panic = escape(view["panic"])
    body = (
        f"<header><h1>{escape(view['title'])}</h1>"
        f'<div id="summary" class="muted">{escape(view["summary"])}</div>'
        f'<div id="panic" class="banner"{"" if panic else " hidden"}>{panic}</div>'
        '<div id="offline" class="banner" hidden>olmd does not answer; showing the last '
        "view</div></header>"
        f"<h2>Fleet</h2><table><thead>{_head(view['columns'])}</thead>"
        f'<tbody id="nodes">{_rows(view["nodes"])}</tbody></table>'
        f"{_teams(view.get('teams'), view['minutes'])}"
        f"<h2>Last {view['minutes']} minutes</h2>"
        f'<div id="charts">{"".join(_chart(c) for c in view["charts"])}</div>'
        f'<h2>Model sync</h2><ul id="sync-lines">{lines}</ul>'
        f'<ul id="pulls">{"".join(_pull(p) for p in sync["pulls"])}</ul>'
        f"<h3>Last manifest</h3><table><thead>{_head(view['manifest_columns'])}</thead>"
        f'<tbody id="manifest">{_rows(manifest)}</tbody></table>'
        f'<p class="muted">updated <span id="updated">{escape(view["updated"])}</span>, '
        f"every {POLL_SECONDS:g} s · "
        '<a href="/ui/status.json">JSON</a> · <a href="/ui/logout">log out</a></p>'
    )
    return _document(view["title"], body, _SCRIPT)


def render_login(message: str = "") -> str:
    """The form that trades the admin token for a session cookie."""
    note = f'<p class="banner">{escape(message)}</p>' if message else ""
    body = (
        "<h1>olmd status</h1>"
        '<p class="muted">The status page needs the admin token (OLMD_ADMIN_TOKEN).</p>'
        f'{note}<form method="post" action="/ui/login">'
        '<input type="password" name="token" autocomplete="current-password" '
        'aria-label="admin token" placeholder="admin token" autofocus required>'
        "<button>Open</button></form>"
    )
    return _document("olmd status: log in", body)
