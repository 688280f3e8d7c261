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
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

__all__ = ["LOGIN_CSP", "PAGE_CSP", "POLL_SECONDS", "render_login", "render_page"]

POLL_SECONDS = 2.0

_STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e;
  --muted: #6e7781; --line: #d0d7de; }
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
.chart { margin: 0; padding: .5rem .7rem; border: 1px solid var(--line); border-radius: 6px;
  min-width: 16rem; }
.chart figcaption { font-weight: 600; }
.spark { display: grid; grid-template-columns: 9.5rem 16rem 5.5rem; align-items: center;
  gap: .6rem; margin: .25rem 0; }
.spark svg { width: 16rem; height: 2.2rem; background: rgba(127, 127, 127, .09); }
.spark path { fill: none; stroke: currentColor; stroke-width: 1.5;
  vector-effect: non-scaling-stroke; }
.spark b { font-weight: 500; text-align: right; }
ul { padding-left: 1.2rem; } #pulls li { display: flex; gap: .7rem; align-items: center; }
progress { width: 12rem; }
form { display: flex; gap: .5rem; margin-top: 1rem; } input { min-width: 20rem; }
"""

_SCRIPT = """
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  const rows = (id, list) => $(id).replaceChildren(...list.map((r) => {
    const tr = el("tr", undefined, r.cls);
    if (r.key) tr.dataset.node = r.key;
    for (const c of r.cells) tr.append(el("td", c));
    return tr;
  }));
  const spark = (title, s) => {
    const box = el("div", undefined, "spark");
    const holder = el("span");
    holder.innerHTML = '<svg viewBox="0 0 120 32" preserveAspectRatio="none"><path></path></svg>';
    holder.querySelector("path").setAttribute("d", s.d);
    box.append(el("span", title), holder.firstChild, el("b", s.label));
    return box;
  };
  const apply = (v) => {
    $("summary").textContent = v.summary;
    $("panic").textContent = v.panic;
    $("panic").hidden = !v.panic;
    $("updated").textContent = v.updated;
    rows("nodes", v.nodes);
    $("charts").replaceChildren(...v.charts.map((c) => {
      const f = el("figure", undefined, "chart");
      f.dataset.node = c.node;
      f.append(el("figcaption", c.node), spark("time to first token", c.ttft),
        spark("requests per second", c.rate));
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
""".replace("POLL_MS", str(int(POLL_SECONDS * 1000)))


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_COMMON_CSP = (
    "default-src 'none'; connect-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
PAGE_CSP = f"{_COMMON_CSP}; script-src {_hash(_SCRIPT)}; style-src {_hash(_STYLE)}"
LOGIN_CSP = f"{_COMMON_CSP}; style-src {_hash(_STYLE)}"


def _rows(rows: Sequence[Mapping[str, Any]]) -> str:
    out = []
    for row in rows:
        cls = f' class="{escape(row["cls"])}"' if row.get("cls") else ""
        key = f' data-node="{escape(row["key"])}"' if row.get("key") else ""
        cells = "".join(f"<td>{escape(c)}</td>" for c in row["cells"])
        out.append(f"<tr{cls}{key}>{cells}</tr>")
    return "".join(out)


def _head(columns: Sequence[str]) -> str:
    return "<tr>" + "".join(f"<th>{escape(c)}</th>" for c in columns) + "</tr>"


def _spark(title: str, spark: Mapping[str, str]) -> str:
    return (
        f'<div class="spark"><span>{escape(title)}</span><svg viewBox="0 0 120 32" '
        f'preserveAspectRatio="none"><path d="{escape(spark["d"])}"></path></svg>'
        f"<b>{escape(spark['label'])}</b></div>"
    )


def _chart(chart: Mapping[str, Any]) -> str:
    return (
        f'<figure class="chart" data-node="{escape(chart["node"])}">'
        f"<figcaption>{escape(chart['node'])}</figcaption>"
        f"{_spark('time to first token', chart['ttft'])}"
        f"{_spark('requests per second', chart['rate'])}</figure>"
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
